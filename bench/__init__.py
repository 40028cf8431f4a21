"""Benchmarks of the plane (bench/README.md); run with `make bench` or `python bench/run.py`."""

import os

# P5 runs libvirt's embedded QEMU driver in the benchmark process, which forks QEMU:
# gRPC's fork handlers must not run in the child (see sfnode/__init__.py). This has
# to happen before anything imports grpc.
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')
# ...and that driver logs to stderr, into the results; its failures still raise.
os.environ.setdefault('LIBVIRT_LOG_OUTPUTS', '4:file:/dev/null')
