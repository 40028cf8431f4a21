"""sf-up: the whole plane on one machine, composed of the three parts (a private
etcd, the controller, the gateway and node processes). Only this package imports
across the parts; the parts never import it."""
