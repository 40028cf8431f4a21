"""The test suite: real etcd, libvirt, QEMU guests and the real sf-client (README: Development)."""
