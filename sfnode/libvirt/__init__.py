"""The node's hypervisor: libvirt (the embedded QEMU driver by default) and what it needs."""
