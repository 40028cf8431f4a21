"""What the controller and the nodes must agree on about disks."""

# A disk of no size is made this big (a blank qcow2, or at least this for an image
# overlay), and the scheduler counts it so.
UNSIZED_DISK_GIB = 1
