"""Tools for testing drivers: the QEMU-guest harness (`aiovfio.testing.vm`)."""
