"""Every refusal of the simulated kernel, in one table.

Each row is a `Rule`: a name, the errno Linux returns, a one-line
description, and the kernel function that enforces it (checked against
torvalds/linux drivers/vfio/*.c and drivers/vfio/pci/*.c, kernels 6.1 to 6.12).
`aiovfio.sim.kernel` raises `rule.error(detail)`: an `OSError` with Linux's
errno whose message names the rule, so a failing test says which rule refused.

The rows are grouped as the kernel's files are: the container and the type1
IOMMU, the group, the vfio-pci device, device I/O, and driver binding.
Rows of the sim's iommufd (drivers/iommu/iommufd) go in their own section.

Where Linux versions differ, the machine's *personality* decides:
`PERSONALITY` is the table (kernel version -> variant, each row naming the
kernel function that makes it so), and `Personality.of("6.1")` is what one
kernel answers. `Machine(linux="6.12")` picks the row; the guest test
tests/vm/test_personality.py compares each row with the running kernel.
"""

from __future__ import annotations

from errno import (
    EADDRINUSE,
    EBADF,
    EBADFD,
    EBUSY,
    EEXIST,
    EFAULT,
    EINVAL,
    EIO,
    EMSGSIZE,
    ENODEV,
    ENOENT,
    ENOMEM,
    ENOSPC,
    ENOTSUP,
    ENOTTY,
    EOPNOTSUPP,
    EOVERFLOW,
    EPERM,
)

from attrs import frozen

__all__ = [
    "KERNELS",
    "NEWEST_KERNEL",
    "PERSONALITY",
    "RULES",
    "Personality",
    "PersonalityRow",
    "Rule",
    "personality_name",
]


@frozen
class Rule:
    """One way the kernel says no."""

    name: str
    errno: int
    description: str
    #: "file.c: function" in torvalds/linux drivers/vfio
    enforced_by: str

    def error(self, detail: str = "") -> OSError:
        """The OSError Linux would raise, with a message naming this rule."""
        what = f"{self.description}: {detail}" if detail else self.description
        return OSError(self.errno, f"{what} [sim rule {self.name}; Linux: {self.enforced_by}]")


# fmt: off
# --- files -------------------------------------------------------------------------------
BAD_FD = Rule(
    "bad_fd", EBADF,
    "not an open file descriptor",
    "fs/file.c: fdget")
USER_MEMORY = Rule(
    "user_memory", EFAULT,
    "the ioctl argument is shorter than what the kernel reads or writes there",
    "copy_from_user / copy_to_user (the caller's buffer ends before argsz or the structure)")
NOT_SUPPORTED = Rule(
    "not_supported", ENOTTY,
    "this ioctl is not supported on this kind of file",
    "vfio_iommu_type1_ioctl / vfio_group_fops_unl_ioctl / vfio_pci_core_ioctl: default")
NO_SUCH_GROUP = Rule(
    "no_such_group", ENOENT,
    "no /dev/vfio/<group> node: the group does not exist or none of its devices is bound "
    "to a VFIO driver",
    "group.c: vfio_group_find_or_alloc (the node exists while a VFIO driver is bound)")
NO_IOMMUFD = Rule(
    "no_iommufd", ENOENT,
    "the simulated machine has no /dev/iommu and no /dev/vfio/devices/ cdevs",
    "drivers/iommu/iommufd/main.c: iommufd_fops (not built)")
NOT_SIMULATED = Rule(
    "not_simulated", ENOTSUP,
    "Linux supports this but the simulated machine does not model it",
    "(none: a limit of aiovfio.sim)")
NO_READ_WRITE = Rule(
    "no_read_write", EINVAL,
    "read/write is not supported on a container or group file",
    "fs/read_write.c: vfs_read (no f_op->read)")
NO_MMAP = Rule(
    "no_mmap", ENODEV,
    "mmap is not supported on a container or group file",
    "mm/mmap.c: do_mmap (no f_op->mmap)")

# --- container and type1 IOMMU -------------------------------------------------------------
CONTAINER_NO_IOMMU = Rule(
    "container_no_iommu", EINVAL,
    "the container has no IOMMU yet: attach a group and VFIO_SET_IOMMU first",
    "container.c: vfio_fops_unl_ioctl (no iommu_driver)")
SET_IOMMU_WITHOUT_GROUP = Rule(
    "set_iommu_without_group", EINVAL,
    "VFIO_SET_IOMMU before any group is attached to the container",
    "container.c: vfio_ioctl_set_iommu (list_empty(&container->group_list))")
SET_IOMMU_TWICE = Rule(
    "set_iommu_twice", EINVAL,
    "VFIO_SET_IOMMU on a container whose IOMMU is already set",
    "container.c: vfio_ioctl_set_iommu (container->iommu_driver)")
SET_IOMMU_UNSUPPORTED = Rule(
    "set_iommu_unsupported", ENODEV,
    "no IOMMU driver offers this IOMMU type",
    "container.c: vfio_ioctl_set_iommu (no driver's CHECK_EXTENSION is positive)")
IOMMU_INFO_ARGSZ = Rule(
    "iommu_info_argsz", EINVAL,
    "vfio_iommu_type1_info.argsz is smaller than the structure",
    "vfio_iommu_type1.c: vfio_iommu_type1_get_info")
MAP_ARGSZ = Rule(
    "map_argsz", EINVAL,
    "vfio_iommu_type1_dma_map.argsz is smaller than the structure",
    "vfio_iommu_type1.c: vfio_iommu_type1_map_dma")
MAP_FLAGS = Rule(
    "map_flags", EINVAL,
    "unknown VFIO_DMA_MAP flags",
    "vfio_iommu_type1.c: vfio_iommu_type1_map_dma")
MAP_NO_PERMISSION = Rule(
    "map_no_permission", EINVAL,
    "a mapping needs READ or WRITE (and neither with VADDR)",
    "vfio_iommu_type1.c: vfio_dma_do_map")
MAP_UNALIGNED = Rule(
    "map_unaligned", EINVAL,
    "size is 0, or vaddr, iova or size is not aligned to the IOMMU page size",
    "vfio_iommu_type1.c: vfio_dma_do_map")
MAP_WRAPS = Rule(
    "map_wraps", EINVAL,
    "the IOVA or virtual address range wraps around",
    "vfio_iommu_type1.c: vfio_dma_do_map")
MAP_OVERLAP = Rule(
    "map_overlap", EEXIST,
    "the IOVA range overlaps an existing mapping",
    "vfio_iommu_type1.c: vfio_dma_do_map (vfio_find_dma)")
MAP_VADDR_NOT_FOUND = Rule(
    "map_vaddr_not_found", ENOENT,
    "VFIO_DMA_MAP_FLAG_VADDR for an IOVA range with no mapping",
    "vfio_iommu_type1.c: vfio_dma_do_map (set_vaddr)")
MAP_VADDR_MISMATCH = Rule(
    "map_vaddr_mismatch", EINVAL,
    "VFIO_DMA_MAP_FLAG_VADDR must name exactly one mapping whose vaddr was invalidated",
    "vfio_iommu_type1.c: vfio_dma_do_map (set_vaddr)")
MAP_ENTRY_LIMIT = Rule(
    "map_entry_limit", ENOSPC,
    "the container has dma_entry_limit mappings already",
    "vfio_iommu_type1.c: vfio_dma_do_map (!iommu->dma_avail)")
MAP_OUTSIDE_IOVA_RANGES = Rule(
    "map_outside_iova_ranges", EINVAL,
    "the IOVA range is not inside one of the ranges VFIO_IOMMU_GET_INFO reports",
    "vfio_iommu_type1.c: vfio_iommu_iova_dma_valid")
MAP_BAD_VADDR = Rule(
    "map_bad_vaddr", EFAULT,
    "the virtual address range is not mapped in the process with the needed access",
    "vfio_iommu_type1.c: vaddr_get_pfns (pin_user_pages_remote)")
MAP_MEMLOCK = Rule(
    "map_memlock", ENOMEM,
    "pinning would exceed RLIMIT_MEMLOCK",
    "vfio_iommu_type1.c: vfio_pin_pages_remote")
UNMAP_ARGSZ = Rule(
    "unmap_argsz", EINVAL,
    "vfio_iommu_type1_dma_unmap.argsz is smaller than the structure",
    "vfio_iommu_type1.c: vfio_iommu_type1_unmap_dma")
UNMAP_FLAGS = Rule(
    "unmap_flags", EINVAL,
    "unknown or conflicting VFIO_DMA_UNMAP flags, or a dirty bitmap without dirty tracking",
    "vfio_iommu_type1.c: vfio_iommu_type1_unmap_dma / vfio_dma_do_unmap")
UNMAP_UNALIGNED = Rule(
    "unmap_unaligned", EINVAL,
    "iova or size is not aligned to the IOMMU page size, size is 0, or the range wraps",
    "vfio_iommu_type1.c: vfio_dma_do_unmap")
UNMAP_ALL_WITH_RANGE = Rule(
    "unmap_all_with_range", EINVAL,
    "VFIO_DMA_UNMAP_FLAG_ALL needs iova 0 and size 0",
    "vfio_iommu_type1.c: vfio_dma_do_unmap")
UNMAP_SPLITS_MAPPING = Rule(
    "unmap_splits_mapping", EINVAL,
    "the range would split a mapping (type1v2 unmaps whole mappings only)",
    "vfio_iommu_type1.c: vfio_dma_do_unmap (iommu->v2)")
UNMAP_VADDR_TWICE = Rule(
    "unmap_vaddr_twice", EINVAL,
    "VFIO_DMA_UNMAP_FLAG_VADDR on a mapping whose vaddr is already invalid",
    "vfio_iommu_type1.c: vfio_dma_do_unmap (dma->vaddr_invalid)")

# --- group ---------------------------------------------------------------------------------
GROUP_BUSY = Rule(
    "group_busy", EBUSY,
    "the group is already open (one opener at a time; open device fds keep it open)",
    "group.c: vfio_group_fops_open (group->opened_file)")
GROUP_GONE = Rule(
    "group_gone", ENODEV,
    "the group's last VFIO device was unbound; this group file is stale",
    "group.c: vfio_group_ioctl_get_status (!group->iommu_group)")
GROUP_STATUS_ARGSZ = Rule(
    "group_status_argsz", EINVAL,
    "vfio_group_status.argsz is smaller than the structure",
    "group.c: vfio_group_ioctl_get_status")
SET_CONTAINER_BAD_FD = Rule(
    "set_container_bad_fd", EBADF,
    "the container fd is not an open file",
    "group.c: vfio_group_ioctl_set_container (fdget)")
SET_CONTAINER_ALREADY_SET = Rule(
    "set_container_already_set", EINVAL,
    "the group is already attached to a container",
    "group.c: vfio_group_ioctl_set_container (vfio_group_has_iommu)")
SET_CONTAINER_NOT_CONTAINER = Rule(
    "set_container_not_container", EBADFD,
    "the fd is neither a VFIO container nor an iommufd",
    "group.c: vfio_group_ioctl_set_container")
SET_CONTAINER_NOT_VIABLE = Rule(
    "set_container_not_viable", EPERM,
    "the group is not viable: a device of the group is bound to a driver that uses DMA",
    "drivers/iommu/iommu.c: iommu_group_claim_dma_owner (group->owner_cnt)")
UNSET_CONTAINER_NOT_SET = Rule(
    "unset_container_not_set", EINVAL,
    "the group is not attached to a container",
    "group.c: vfio_group_ioctl_unset_container (!vfio_group_has_iommu)")
UNSET_CONTAINER_BUSY = Rule(
    "unset_container_busy", EBUSY,
    "a device of the group is open; close its device fds first",
    "group.c: vfio_group_ioctl_unset_container (container_users != 1)")
DEVICE_NAME_UNKNOWN = Rule(
    "device_name_unknown", ENODEV,
    "no device of that name in the group is bound to a VFIO driver",
    "group.c: vfio_device_get_from_name")
DEVICE_NAME_MALFORMED = Rule(
    "device_name_malformed", EINVAL,
    "the device name has trailing junk or no NUL within a page",
    "vfio_pci_core.c: vfio_pci_core_match / mm/util.c: strndup_user")
DEVICE_FD_NO_IOMMU = Rule(
    "device_fd_no_iommu", EINVAL,
    "GET_DEVICE_FD before the group is attached to a container with an IOMMU",
    "group.c: vfio_df_group_open / container.c: vfio_group_use_container")

# --- vfio-pci device -----------------------------------------------------------------------
DEVICE_INFO_ARGSZ = Rule(
    "device_info_argsz", EINVAL,
    "vfio_device_info.argsz is smaller than the structure",
    "vfio_pci_core.c: vfio_pci_ioctl_get_info")
REGION_INFO_ARGSZ = Rule(
    "region_info_argsz", EINVAL,
    "vfio_region_info.argsz is smaller than the structure",
    "vfio_pci_core.c: vfio_pci_ioctl_get_region_info")
REGION_INFO_INDEX = Rule(
    "region_info_index", EINVAL,
    "no such region index (VGA is absent on this device)",
    "vfio_pci_core.c: vfio_pci_ioctl_get_region_info")
IRQ_INFO_ARGSZ = Rule(
    "irq_info_argsz", EINVAL,
    "vfio_irq_info.argsz is smaller than the structure",
    "vfio_pci_core.c: vfio_pci_ioctl_get_irq_info")
IRQ_INFO_INDEX = Rule(
    "irq_info_index", EINVAL,
    "no such IRQ index (ERR exists only on PCI Express devices)",
    "vfio_pci_core.c: vfio_pci_ioctl_get_irq_info")
SET_IRQS_HEADER = Rule(
    "set_irqs_header", EINVAL,
    "vfio_irq_set has a short argsz, an index past REQ, unknown flags or a count that overflows",
    "vfio_main.c: vfio_set_irqs_validate_and_prepare")
SET_IRQS_RANGE = Rule(
    "set_irqs_range", EINVAL,
    "start/count are outside the vectors this IRQ index has",
    "vfio_main.c: vfio_set_irqs_validate_and_prepare")
SET_IRQS_DATA_TYPE = Rule(
    "set_irqs_data_type", EINVAL,
    "exactly one of DATA_NONE, DATA_BOOL, DATA_EVENTFD is needed",
    "vfio_main.c: vfio_set_irqs_validate_and_prepare")
SET_IRQS_DATA_SIZE = Rule(
    "set_irqs_data_size", EINVAL,
    "argsz is too small for count data items",
    "vfio_main.c: vfio_set_irqs_validate_and_prepare")
SET_IRQS_ACTION = Rule(
    "set_irqs_action", ENOTTY,
    "exactly one action is needed, and MSI/MSI-X/ERR/REQ only support TRIGGER",
    "vfio_pci_intrs.c: vfio_pci_set_irqs_ioctl (no handler)")
SET_IRQS_BAD_EVENTFD = Rule(
    "set_irqs_bad_eventfd", EBADF,
    "an eventfd in the data is not an open file descriptor",
    "fs/eventfd.c: eventfd_ctx_fdget")
SET_IRQS_NOT_EVENTFD = Rule(
    "set_irqs_not_eventfd", EINVAL,
    "a file descriptor in the data is not an eventfd",
    "fs/eventfd.c: eventfd_ctx_fileget")
SET_IRQS_OTHER_TYPE_ENABLED = Rule(
    "set_irqs_other_type_enabled", EINVAL,
    "another interrupt type is enabled on this device; disable it first (count 0, DATA_NONE)",
    "vfio_pci_intrs.c: vfio_pci_set_msi_trigger / vfio_pci_set_intx_trigger")
SET_IRQS_NOT_ENABLED = Rule(
    "set_irqs_not_enabled", EINVAL,
    "this interrupt type is not enabled (mask, unmask and loopback need it enabled)",
    "vfio_pci_intrs.c: vfio_pci_set_intx_unmask / _mask / vfio_pci_set_msi_trigger")
SET_IRQS_INTX_RANGE = Rule(
    "set_irqs_intx_range", EINVAL,
    "INTx, ERR and REQ take start 0 and count 1",
    "vfio_pci_intrs.c: vfio_pci_set_intx_trigger / vfio_pci_set_ctx_trigger_single")
SET_IRQS_VECTOR_NOT_ALLOCATED = Rule(
    "set_irqs_vector_not_allocated", EINVAL,
    "the vectors are past those allocated when the index was enabled; disable and re-enable",
    "vfio_pci_intrs.c: vfio_msi_set_block / vfio_msi_alloc_irq")
SET_IRQS_MASK_EVENTFD = Rule(
    "set_irqs_mask_eventfd", ENOTTY,
    "INTx ACTION_MASK with DATA_EVENTFD is not implemented by vfio-pci",
    "vfio_pci_intrs.c: vfio_pci_set_intx_mask")
RESET_NOT_SUPPORTED = Rule(
    "reset_not_supported", EINVAL,
    "the device cannot be reset (the device flags do not say RESET)",
    "vfio_pci_core.c: vfio_pci_ioctl_reset (!vdev->reset_works)")
HOT_RESET_INFO_ARGSZ = Rule(
    "hot_reset_info_argsz", EINVAL,
    "vfio_pci_hot_reset_info.argsz is smaller than the structure",
    "vfio_pci_core.c: vfio_pci_ioctl_get_pci_hot_reset_info")
HOT_RESET_NO_BUS_RESET = Rule(
    "hot_reset_no_bus_reset", ENODEV,
    "neither a slot nor a bus reset is possible (a device on the root bus)",
    "vfio_pci_core.c: vfio_pci_ioctl_get_pci_hot_reset_info (pci_probe_reset_bus)")
HOT_RESET_INFO_SPACE = Rule(
    "hot_reset_info_space", ENOSPC,
    "argsz has no room for every affected device; count says how many",
    "vfio_pci_core.c: vfio_pci_ioctl_get_pci_hot_reset_info")
HOT_RESET_HEADER = Rule(
    "hot_reset_header", EINVAL,
    "vfio_pci_hot_reset has a short argsz, flags set, or a count of 0 or too many group fds",
    "vfio_pci_core.c: vfio_pci_ioctl_pci_hot_reset")
HOT_RESET_BAD_GROUP_FD = Rule(
    "hot_reset_bad_group_fd", EBADF,
    "a group fd is not an open file",
    "vfio_pci_core.c: vfio_pci_ioctl_pci_hot_reset (fget)")
HOT_RESET_NOT_GROUP = Rule(
    "hot_reset_not_group", EINVAL,
    "a group fd is not a VFIO group",
    "vfio_pci_core.c: vfio_pci_ioctl_pci_hot_reset (vfio_file_is_group)")
HOT_RESET_NOT_OWNED = Rule(
    "hot_reset_not_owned", EINVAL,
    "a device the reset affects is not bound to vfio-pci or its group is not in the list",
    "vfio_pci_core.c: vfio_pci_dev_set_hot_reset / vfio_pci_dev_set_resettable")
FEATURE_HEADER = Rule(
    "feature_header", EINVAL,
    "vfio_device_feature has a short argsz, unknown flags, or GET and SET without PROBE",
    "vfio_main.c: vfio_ioctl_device_feature")
FEATURE_UNSUPPORTED = Rule(
    "feature_unsupported", ENOTTY,
    "the device does not support this feature",
    "vfio_pci_core.c: vfio_pci_core_ioctl_feature")
FEATURE_OPS = Rule(
    "feature_ops", EINVAL,
    "the feature does not support this GET/SET, or argsz is too small for it",
    "vfio_main.c: vfio_check_feature")
BIND_IOMMUFD_GROUP_DEVICE = Rule(
    "bind_iommufd_group_device", EINVAL,
    "VFIO_DEVICE_BIND_IOMMUFD is only for device cdev fds, not fds from a group",
    "device_cdev.c: vfio_df_ioctl_bind_iommufd (df->group)")

# --- device I/O ----------------------------------------------------------------------------
IO_BAD_REGION = Rule(
    "io_bad_region", EINVAL,
    "the offset names no region (or an absent BAR, ROM or VGA)",
    "vfio_pci_core.c: vfio_pci_rw / vfio_pci_rdwr.c: vfio_pci_bar_rw")
IO_PAST_END = Rule(
    "io_past_end", EINVAL,
    "the offset is past the end of the region",
    "vfio_pci_rdwr.c: vfio_pci_bar_rw (pos >= end)")
IO_SHORT = Rule(
    "io_short", EIO,
    "the access runs past the end of the region: the kernel transfers only part of it",
    "vfio_pci_rdwr.c: vfio_pci_bar_rw (count clipped); aiovfio LinuxKernel turns it into EIO")
IO_READ_ONLY = Rule(
    "io_read_only", EINVAL,
    "the region is read-only (the ROM)",
    "vfio_pci_core.c: vfio_pci_rw (ROM write)")
IO_CONFIG_RANGE = Rule(
    "io_config_range", EFAULT,
    "the access is outside config space",
    "vfio_pci_config.c: vfio_config_do_rw")
IO_MEMORY_DISABLED = Rule(
    "io_memory_disabled", EIO,
    "Memory Space is disabled in the COMMAND register",
    "vfio_pci_rdwr.c: vfio_pci_ioread32 / __vfio_pci_memory_enabled")
MMAP_NOT_MAPPABLE = Rule(
    "mmap_not_mappable", EINVAL,
    "the region (or that part of it) cannot be mmapped: it is trapped",
    "vfio_pci_core.c: vfio_pci_core_mmap")
MMAP_BAD_RANGE = Rule(
    "mmap_bad_range", EINVAL,
    "the length is 0, or the offset is not page aligned",
    "mm/mmap.c: do_mmap")

# --- iommufd: /dev/iommu, IOAS objects, the VFIO device cdev --------------------------------
IOMMUFD_CMD_SIZE = Rule(
    "iommufd_cmd_size", EINVAL,
    "the iommufd command's size is smaller than its structure",
    "iommufd/main.c: iommufd_fops_ioctl (ucmd.user_size < op->min_size)")
IOMMUFD_FLAGS = Rule(
    "iommufd_flags", EOPNOTSUPP,
    "unknown flags in an iommufd command",
    "iommufd/ioas.c: iommufd_ioas_alloc_ioctl / iommufd_ioas_map")
IOMMUFD_NO_OBJECT = Rule(
    "iommufd_no_object", ENOENT,
    "no IOAS with this id in this iommufd",
    "iommufd/main.c: iommufd_get_object")
IOMMUFD_OBJECT_BUSY = Rule(
    "iommufd_object_busy", EBUSY,
    "the IOAS still has devices attached",
    "iommufd/main.c: iommufd_object_remove (refcount)")
IOAS_RANGES_SPACE = Rule(
    "ioas_ranges_space", EMSGSIZE,
    "num_iovas is smaller than the IOAS's number of ranges (the count is written back)",
    "iommufd/ioas.c: iommufd_ioas_iova_ranges")
IOAS_MAP_NO_PERMISSION = Rule(
    "ioas_map_no_permission", EINVAL,
    "an IOAS map needs READABLE, WRITEABLE or both",
    "iommufd/ioas.c: iommufd_ioas_map")
IOAS_MAP_OVERFLOW = Rule(
    "ioas_map_overflow", EOVERFLOW,
    "the IOVA range wraps past the end of the address space",
    "iommufd/ioas.c: iommufd_ioas_map; io_pagetable.c: iopt_check_iova")
IOAS_MAP_UNALIGNED = Rule(
    "ioas_map_unaligned", EINVAL,
    "IOVA, length or user address is not aligned to the IOAS's IOVA alignment",
    "iommufd/io_pagetable.c: iopt_check_iova / iopt_alloc_area_pages")
IOAS_MAP_RESERVED = Rule(
    "ioas_map_reserved", EINVAL,
    "the IOVA range is outside the IOAS's allowed ranges (reserved by an attached domain)",
    "iommufd/io_pagetable.c: iopt_check_iova (iopt_reserved_iter_first)")
IOAS_MAP_OVERLAP = Rule(
    "ioas_map_overlap", EEXIST,
    "the IOVA range overlaps an existing mapping in the IOAS",
    "iommufd/io_pagetable.c: iopt_check_iova (iopt_area_iter_first)")
IOAS_MAP_NO_SPACE = Rule(
    "ioas_map_no_space", ENOSPC,
    "no free IOVA range of this size and alignment is left for the kernel to pick",
    "iommufd/io_pagetable.c: iopt_alloc_iova")
IOAS_MAP_BAD_VADDR = Rule(
    "ioas_map_bad_vaddr", EFAULT,
    "the user address range is not mapped in the process with the needed access",
    "iommufd/pages.c: pfn_reader_user_pin (pin_user_pages_fast)")
IOAS_MAP_MEMLOCK = Rule(
    "ioas_map_memlock", ENOMEM,
    "pinning would exceed RLIMIT_MEMLOCK",
    "iommufd/pages.c: incr_user_locked_vm")
IOAS_UNMAP_EMPTY = Rule(
    "ioas_unmap_empty", EINVAL,
    "an unmap of length 0 (only iova 0 with length U64_MAX means all)",
    "iommufd/io_pagetable.c: iopt_unmap_iova")
IOAS_UNMAP_SPLITS = Rule(
    "ioas_unmap_splits", ENOENT,
    "the unmap range starts or ends inside a mapping: unmap whole mappings",
    "iommufd/io_pagetable.c: iopt_unmap_iova_range")
IOAS_UNMAP_NOTHING = Rule(
    "ioas_unmap_nothing", ENOENT,
    "nothing is mapped in the unmap range",
    "iommufd/io_pagetable.c: iopt_unmap_iova_range")
NOIOMMU_NO_MAPPINGS = Rule(
    "noiommu_no_mappings", ENOTTY,
    "a noiommu container has no IOMMU: no GET_INFO, MAP_DMA or UNMAP_DMA (DMA uses "
    "physical addresses)",
    "vfio_main.c: vfio_noiommu_ioctl")
NOIOMMU_GROUP_NODE = Rule(
    "noiommu_group_node", ENOENT,
    "a noiommu group's node is /dev/vfio/noiommu-<group>, an IOMMU group's is "
    "/dev/vfio/<group>",
    "group.c: vfio_group_alloc (dev_set_name \"noiommu-%d\" for VFIO_NO_IOMMU)")
CDEV_NONE = Rule(
    "cdev_none", ENOENT,
    "no /dev/vfio/devices/<cdev> node: the device is not bound to a VFIO driver, or it is "
    "a noiommu device (which has no cdev)",
    "vfio.h: vfio_device_add (cdev_device_add, not for noiommu devices)")
CDEV_NOT_BOUND = Rule(
    "cdev_not_bound", EINVAL,
    "a device cdev needs VFIO_DEVICE_BIND_IOMMUFD before any other ioctl, read, write or mmap",
    "vfio_main.c: vfio_device_fops_unl_ioctl (df->access_granted)")
BIND_BAD_ARGS = Rule(
    "bind_bad_args", EINVAL,
    "VFIO_DEVICE_BIND_IOMMUFD: argsz too small, flags set, or a negative iommufd",
    "device_cdev.c: vfio_df_ioctl_bind_iommufd")
BIND_NOT_IOMMUFD = Rule(
    "bind_not_iommufd", EBADFD,
    "the fd given to VFIO_DEVICE_BIND_IOMMUFD is not an open /dev/iommu",
    "iommufd/main.c: iommufd_ctx_from_fd")
BIND_TWICE = Rule(
    "bind_twice", EINVAL,
    "the device is already bound through a cdev (one bind per device)",
    "device_cdev.c: vfio_df_ioctl_bind_iommufd (df->access_granted); "
    "vfio_main.c: vfio_df_open (open_count)")
BIND_GROUP_OPEN = Rule(
    "bind_group_open", EBUSY,
    "the device's group is open (/dev/vfio/<group>): the group path and the cdev exclude "
    "each other",
    "group.c: vfio_device_block_group (group->opened_file)")
GROUP_CDEV_BOUND = Rule(
    "group_cdev_bound", EBUSY,
    "a device of the group is bound through its cdev: the cdev and the group path exclude "
    "each other",
    "group.c: vfio_group_fops_open (group->cdev_device_open_cnt)")
ATTACH_NOT_IOAS = Rule(
    "attach_not_ioas", ENOENT,
    "pt_id names no IOAS or hardware page table of the bound iommufd",
    "iommufd/device.c: iommufd_device_change_pt (iommufd_get_object)")
ATTACH_RESERVED_OVERLAP = Rule(
    "attach_reserved_overlap", EADDRINUSE,
    "the IOAS already maps IOVAs the device's IOMMU domain reserves",
    "iommufd/io_pagetable.c: iopt_table_enforce_dev_resv_regions")

# --- driver binding (Machine.set_driver / add_device) --------------------------------------
BIND_DMA_OWNED = Rule(
    "bind_dma_owned", EBUSY,
    "a driver that uses DMA cannot bind while user space owns the group's DMA",
    "drivers/iommu/iommu.c: iommu_device_use_default_domain (group->owner)")
UNBIND_DEVICE_OPEN = Rule(
    "unbind_device_open", EBUSY,
    "the device is open through VFIO; Linux would block and signal REQ until it is closed",
    "vfio_main.c: vfio_unregister_group_dev (the sim refuses instead of blocking)")
# fmt: on

#: The table, in the order above.
RULES: tuple[Rule, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Rule))


# --- kernel personalities -------------------------------------------------------------------

#: The kernels the project proves in the QEMU guest, oldest first. "6.12-iommufd"
#: is the 6.12 kernel the harness builds (aiovfio.testing.vm_kernel): iommufd
#: serves /dev/vfio/vfio (CONFIG_IOMMUFD_VFIO_CONTAINER), so its container answers
#: as drivers/iommu/iommufd/vfio_compat.c does, not as vfio_iommu_type1.c.
KERNELS: tuple[str, ...] = ("6.1", "6.12", "6.12-iommufd")
#: What `Machine()` simulates unless told otherwise (Debian's newest kernel).
NEWEST_KERNEL = "6.12"


@frozen
class PersonalityRow:
    """One behaviour that differs (or could differ) between kernels."""

    name: str
    description: str
    #: kernel version -> what that kernel does
    answers: dict[str, object]
    #: "file.c: function" in torvalds/linux that makes it so
    enforced_by: str


# fmt: off
PERSONALITY: tuple[PersonalityRow, ...] = (
    PersonalityRow(
        "msix_noresize",
        "VFIO_DEVICE_GET_IRQ_INFO(MSI-X) has NORESIZE (no dynamic MSI-X)",
        {"6.1": True, "6.12": False, "6.12-iommufd": False},
        "vfio_pci_core.c: vfio_pci_ioctl_get_irq_info (!vdev->has_dyn_msix; dynamic MSI-X "
        "since 6.5)"),
    PersonalityRow(
        "msix_dynamic",
        "vectors past those allocated can be hooked while MSI-X is enabled",
        {"6.1": False, "6.12": True, "6.12-iommufd": True},
        "vfio_pci_intrs.c: vfio_msi_set_vector_signal / vfio_msi_alloc_irq (has_dyn_msix)"),
    PersonalityRow(
        "msix_loopback_unallocated",
        "a DATA_NONE/BOOL trigger of a vector never allocated: 0 (ignored) or EINVAL",
        {"6.1": "EINVAL", "6.12": 0, "6.12-iommufd": 0},
        "vfio_pci_intrs.c: vfio_pci_set_msi_trigger (6.1: start + count > num_ctx; 6.12: "
        "vfio_irq_ctx_get is NULL, skipped)"),
    PersonalityRow(
        "iommu_info_cap_align",
        "each VFIO_IOMMU_GET_INFO capability is padded to this many bytes (argsz 116 or 120)",
        {"6.1": 1, "6.12": 8, "6.12-iommufd": 8},
        "vfio_main.c: vfio_info_cap_add (ALIGN(size, sizeof(u64)) from 6.8)"),
    PersonalityRow(
        "bar_io_width",
        "the widest single access vfio-pci's pread/pwrite makes to a BAR",
        {"6.1": 4, "6.12": 8, "6.12-iommufd": 8},
        "vfio_pci_rdwr.c: vfio_pci_core_do_io_rw (8-byte ioread64/iowrite64 from 6.11)"),
    PersonalityRow(
        "type1_nesting",
        "CHECK_EXTENSION(VFIO_TYPE1_NESTING_IOMMU)",
        {"6.1": 1, "6.12": 1, "6.12-iommufd": 0},
        "vfio_iommu_type1.c: vfio_iommu_type1_check_extension (removed in 6.13); "
        "iommufd/vfio_compat.c: iommufd_vfio_check_extension (obsolete: 0)"),
    PersonalityRow(
        "update_vaddr_before_set_iommu",
        "CHECK_EXTENSION(VFIO_UPDATE_VADDR) on a container without an IOMMU",
        {"6.1": 0, "6.12": 0, "6.12-iommufd": 0},
        "vfio_iommu_type1.c: vfio_iommu_type1_check_extension (iommu && ...)"),
    PersonalityRow(
        "command_after_open",
        "PCI COMMAND right after the first open (I/O, Memory, SERR; Bus Master clear)",
        {"6.1": 0x0103, "6.12": 0x0103, "6.12-iommufd": 0x0103},
        "vfio_pci_core.c: vfio_pci_core_enable (pci_enable_device, pci_clear_master; "
        "the firmware's I/O and SERR stay)"),
    PersonalityRow(
        "ro_pin_zero_page",
        "a READ-only MAP_DMA of never-written private anonymous memory pins the shared zero "
        "page: the device still reads zeros after the process writes there",
        {"6.1": "zero page", "6.12": "coherent", "6.12-iommufd": "coherent"},
        "mm/gup.c: __get_user_pages, from vfio_iommu_type1.c: vaddr_get_pfns (FOLL_LONGTERM "
        "without FOLL_WRITE); a R/O long-term pin unshares COW pages, the zero page too, from "
        "6.2 ('mm/gup: reliable R/O long-term pinning in COW mappings')"),
    PersonalityRow(
        "msix_rehook_failure",
        "re-hooking an enabled MSI-X block with a bad eventfd unhooks start..the failing one",
        {"6.1": "unhooked", "6.12": "unhooked", "6.12-iommufd": "unhooked"},
        "vfio_pci_intrs.c: vfio_msi_set_block (the error path sets every vector from start "
        "up to the failing one to -1)"),
)
# fmt: on


@frozen
class Personality:
    """What one kernel version answers, one attribute per `PERSONALITY` row."""

    linux: str
    msix_noresize: bool
    msix_dynamic: bool
    msix_loopback_unallocated: object
    iommu_info_cap_align: int
    bar_io_width: int
    type1_nesting: int
    update_vaddr_before_set_iommu: int
    command_after_open: int
    ro_pin_zero_page: object
    msix_rehook_failure: object

    @classmethod
    def of(cls, linux: str) -> Personality:
        """The personality of kernel `linux` ("6.1" or "6.12")."""
        if linux not in KERNELS:
            from ..errors import InvalidArgument

            raise InvalidArgument(
                f"linux={linux!r} is not a kernel the sim knows; use one of "
                f"{', '.join(KERNELS)} (the kernels the guest suite proves)"
            )
        values = {row.name: row.answers[linux] for row in PERSONALITY}
        return cls(linux=linux, **values)  # type: ignore[arg-type]

    def row(self, name: str) -> PersonalityRow:
        for row in PERSONALITY:
            if row.name == name:
                return row
        raise KeyError(name)


def personality_name(release: str) -> str:
    """The personality for a kernel release: "6.12.95+deb12-amd64" -> "6.12".

    The kernel the harness builds with iommufd ("6.12-iommufd", or its release
    "6.12.117-aiovfio") gets "6.12-iommufd". A release between two proven
    kernels gets the older one's personality; an unknown one raises
    InvalidArgument.
    """
    from ..errors import InvalidArgument

    if release in KERNELS:
        return release
    if release.endswith(("-iommufd", "-aiovfio")):
        return "6.12-iommufd"
    head = release.split("-", 1)[0].split("+", 1)[0].split(".")
    try:
        version = (int(head[0]), int(head[1]))
    except (IndexError, ValueError):
        raise InvalidArgument(
            f"{release!r} is not a kernel release like 6.12 or 6.1.0-57"
        ) from None
    numbered = [k for k in KERNELS if "-" not in k]
    known = [k for k in numbered if tuple(int(x) for x in k.split(".")) <= version]
    if not known:
        raise InvalidArgument(
            f"kernel {release} is older than the oldest the sim knows ({KERNELS[0]})"
        )
    return known[-1]
