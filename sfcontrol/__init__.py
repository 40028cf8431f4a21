"""sfcontrol: the controller (public API, node API, peer blob copies), all state in etcd."""
