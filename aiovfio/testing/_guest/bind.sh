# Bind the emulated test devices to vfio-pci (sourced by stage.sh).
#
# $vm_devices holds words "kind,bdf,vendor:device,class" written by the host.
# Each device is checked to be what the host put at that address, gets
# driver_override=vfio-pci and loses any driver it has; one modprobe then loads
# vfio-pci, which takes them all. Writes "kind bdf group=N driver=D" lines to
# /run/aiovfio/devices. Builtins only, but for that modprobe (which succeeds
# for a built-in vfio-pci; drivers_probe then binds the devices).
vm_ifs=$IFS

vm_prepare() { # kind bdf ids class
	IFS=$vm_ifs
	vm_d=/sys/bus/pci/devices/$2
	if ! [ -e "$vm_d" ]; then
		echo "$1 $2 missing" >>$vm_run/devices
		return 1
	fi
	read -r vm_ven <"$vm_d/vendor"
	read -r vm_dev <"$vm_d/device"
	read -r vm_cls <"$vm_d/class"
	if [ "${vm_ven#0x}:${vm_dev#0x} $vm_cls" != "$3 $4" ]; then
		echo "$1 $2 is ${vm_ven#0x}:${vm_dev#0x} class $vm_cls, not $3 class $4" >>$vm_run/devices
		return 1
	fi
	echo vfio-pci >"$vm_d/driver_override"
	if [ -e "$vm_d/driver" ] && ! [ -e "/sys/bus/pci/drivers/vfio-pci/$2" ]; then
		echo "$2" >"$vm_d/driver/unbind"
	fi
}

vm_check() { # kind bdf ids class
	IFS=$vm_ifs
	if ! [ -e "/sys/bus/pci/drivers/vfio-pci/$2" ]; then
		echo "$2" >/sys/bus/pci/drivers_probe 2>/dev/null
	fi
	vm_drv=none
	[ -e "/sys/bus/pci/drivers/vfio-pci/$2" ] && vm_drv=vfio-pci
	vm_grp=none
	for vm_g in /sys/kernel/iommu_groups/*/devices/"$2"; do
		[ -e "$vm_g" ] && vm_grp=${vm_g%/devices/*} && vm_grp=${vm_grp##*/}
	done
	# a noiommu group's node is /dev/vfio/noiommu-N
	vm_node=/dev/vfio/$vm_grp
	[ -c "$vm_node" ] || vm_node=/dev/vfio/noiommu-$vm_grp
	echo "$1 $2 group=$vm_grp driver=$vm_drv node=${vm_node#/dev/vfio/}" >>$vm_run/devices
	[ $vm_drv = vfio-pci ] && [ -c "$vm_node" ]
}

vm_bind() {
	: >$vm_run/devices
	vm_ok=0
	for vm_spec in $vm_devices; do
		IFS=,
		vm_prepare $vm_spec || vm_ok=1
	done
	IFS=$vm_ifs
	[ $vm_ok = 0 ] || return 1
	if ! /sbin/modprobe vfio-pci; then
		echo "modprobe vfio-pci failed" >>$vm_run/devices
		return 1
	fi
	: >$vm_run/devices
	for vm_spec in $vm_devices; do
		IFS=,
		vm_check $vm_spec || vm_ok=1
	done
	IFS=$vm_ifs
	[ -c /dev/vfio/vfio ] || vm_ok=1
	return $vm_ok
}
