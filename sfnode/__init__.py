"""sfnode: the node agent."""

import os

# The embedded libvirt driver forks QEMU from this process. gRPC's fork
# handlers would then run in the child, between fork and exec, and crash it
# (its event engine's file descriptors are already closed there). The node
# never forks to run Python, so it needs no fork support from gRPC. This must
# happen before grpc is first imported.
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')
