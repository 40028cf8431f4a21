"""The node's part of virtual networks: the mesh (sfnode/network/mesh.py), DHCP and
DNS on a network node (sfnode/network/dhcp.py), and the loop that converges both
to what the controller says (sfnode/network/carrier.py).

Where things live, and why (measured: shared/reference/network-dataplane.md).
sfnode stays in the root network namespace, and so do each network's bridge and
the guests' taps: libvirt's embedded driver cannot use a bridge in another
namespace ("Cannot get interface MTU"), and running libvirt itself under
`ip netns exec` would need management veths with root addresses to reach the
controller, which the machine's rules forbid. What is per node is the VTEP: each
VXLAN is created in the node's mesh namespace (sf-up's per-node underlay, where
its UDP socket stays bound to the node's mesh address), then moved into the root
namespace and enslaved to the bridge. Without a mesh namespace (a real host) it
is created in the root namespace on the mesh device. A network node's DHCP and
DNS run in a namespace of their own per network, joined to the bridge by a veth.

Nothing is changed in the root namespace but links that carry the node's
prefix: no addresses, routes, forwarding or firewall. Every device and namespace
is named with the prefix, so a restarted node finds its own by listing them:
the bridge <prefix><vni>, the VXLAN <prefix>v<vni>, the DHCP veth <prefix>h<vni>
(int0 inside) and the namespace <prefix>dhcp-<vni>, the VNI as 6 hex digits.
Links are at most 15 characters: the prefix is at most 8.

All of a network's links are at NETWORK_MTU (1450: the underlay's 1500 less the
VXLAN header); the guest learns it by DHCP (option 26, forced) and from the
config drive. One network node per plane in this stage: two would both hold
the gateway address.
"""
