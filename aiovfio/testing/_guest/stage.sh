# The aiovfio guest's stage: run by the host's /bin/sh, chrooted into the
# overlay of the host's /, with stdout and stderr on the port that is the
# host's stdout. Sources the job the host wrote (the caller's environment, the
# command as "$@", vm_* settings), binds the devices, runs the command under a
# timeout and leaves its exit code in /run/aiovfio/rc.
#
# Shell builtins only, but for modprobe and timeout: under TCG every
# fork+exec costs 20-50 ms.
vm_run=/run/aiovfio
stamp() {
	read -r vm_up _ </proc/uptime
	echo "$1 $vm_up" >>$vm_run/times
}
stamp stage
. $vm_run/job
ulimit -l unlimited 2>/dev/null

if [ -n "$vm_devices" ]; then
	. $vm_run/bind.sh
	if ! vm_bind; then
		echo "aiovfio vm: binding the devices to vfio-pci failed:"
		while read -r vm_line; do echo "  $vm_line"; done <$vm_run/devices
		echo 125 >$vm_run/rc
		exit 0
	fi
fi
stamp bound

if ! cd "$vm_cwd"; then
	echo "aiovfio vm: no folder $vm_cwd in the guest"
	echo 126 >$vm_run/rc
	exit 0
fi
/usr/bin/timeout --kill-after=10 "$vm_timeout" "$@"
vm_rc=$?
stamp done
echo $vm_rc >$vm_run/rc
