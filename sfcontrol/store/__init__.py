"""State in etcd: the key layout, transactions and watches, and the in-memory mirror every read is served from."""
