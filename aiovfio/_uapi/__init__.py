"""Pure data: ctypes mirrors of the kernel's VFIO ABI, ioctl numbers, PCI
config-space constants and capability-chain decoding. No I/O happens here."""
