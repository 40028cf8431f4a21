"""Networks, IPAM and network interfaces."""

import ipaddress
import random
import uuid as uuidlib

from sfcommon import errors
from sfcontrol import caller, meshes
from sfcontrol.core import Core
from sfcontrol.store import keys
from sfcontrol.store.cache import untracked
from sfcontrol.store.etcd import Txn
from shakenfist.v1 import event_pb2, specs_pb2
from shakenfist.v1 import network_pb2 as pb
from shakenfist.v1 import network_service_pb2 as api

NET = pb.NetworkState
IFACE = pb.NetworkInterfaceState
OBJ_NETWORK = event_pb2.OBJECT_TYPE_NETWORK
OBJ_IFACE = event_pb2.OBJECT_TYPE_NETWORK_INTERFACE
AUDIT, STATUS = event_pb2.EVENT_TYPE_AUDIT, event_pb2.EVENT_TYPE_STATUS
MIN_PREFIX = 29
DEFAULT_PAGE = 1000


def parse_netblock(netblock: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(netblock, strict=False)
    except ValueError as e:
        raise errors.InvalidArgument(f'cannot parse netblock: {e}')
    if net.prefixlen > MIN_PREFIX:
        raise errors.InvalidArgument(f'network is below minimum size of /{MIN_PREFIX}')
    return net


def gateway(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The first host address is the network's router, never handed out."""
    return net.network_address + 1


def _assignable(net, address) -> bool:
    return address in net and address not in (net.network_address, net.broadcast_address,
                                              gateway(net))


class Networks:
    def __init__(self, core: Core, floating_netblock: str):
        self.core = core
        self.floating = ipaddress.IPv4Network(floating_netblock)

    # -- lookups ---------------------------------------------------------------
    def resolve(self, ref: str, namespace: str | None = None):
        """A network by UUID or name, as the caller may see it; NOT_FOUND otherwise."""
        me = caller.current()
        ns = namespace or me.namespace
        if namespace and not me.can_see(namespace):
            raise errors.NotFound('network not found')
        entry = self.core.cache.by_uuid(keys.NETWORKS, ref)
        if entry is None:
            matches, _ = self.core.cache.range(keys.networks(ns), filter=lambda n: n.name == ref
                                               and n.state != NET.Value('NETWORK_STATE_DELETED'))
            entry = matches[0] if len(matches) == 1 else None
        if entry is None or not me.can_see(entry.value.namespace):
            raise errors.NotFound('network not found')
        return entry

    def interface(self, uuid: str):
        entry = self.core.cache.get(keys.interface(uuid))
        if entry is None or not self._visible(entry.value):
            raise errors.NotFound('interface not found')
        return entry

    def _visible(self, iface) -> bool:
        inst = self.core.cache.by_uuid(keys.INSTANCES, iface.instance_uuid)
        return inst is not None and caller.current().can_see(inst.value.namespace)

    def interfaces_of(self, instance_uuid: str):
        """The instance's interfaces that still exist, in order."""
        deleted = IFACE.Value('NETWORK_INTERFACE_STATE_DELETED')
        entries = self.core.cache.where(keys.INTERFACES, 'instance_uuid', instance_uuid)
        return sorted((e.value for e in entries if e.value.state != deleted), key=lambda i: i.order)

    def interfaces_on(self, network_uuid: str):
        """The interfaces that still exist on a network."""
        deleted = IFACE.Value('NETWORK_INTERFACE_STATE_DELETED')
        return [e.value for e in self.core.cache.where(keys.INTERFACES, 'network_uuid', network_uuid)
                if e.value.state != deleted]

    # -- networks --------------------------------------------------------------
    async def create(self, req: api.CreateNetworkRequest) -> api.CreateNetworkResponse:
        me = caller.current()
        ns = req.namespace if req.HasField('namespace') else me.namespace
        if not me.can_see(ns):
            raise errors.NotFound('namespace not found')
        if not req.name:
            raise errors.InvalidArgument('name: a network needs a name')
        net = parse_netblock(req.netblock)

        def build():
            if self.core.cache.get(keys.namespace(ns)) is None:
                raise errors.NotFound('namespace not found')
            # Checked in build, so that a create that lost a race for the name guard
            # sees the winner when it is retried (rather than retrying until UNAVAILABLE).
            name_taken = self.core.cache.range(
                keys.networks(ns), filter=lambda n: n.name == req.name
                and n.state != NET.Value('NETWORK_STATE_DELETED'))[0]
            if name_taken:
                raise errors.AlreadyExists(f'a network named {req.name} already exists')
            network = pb.Network(
                uuid=str(uuidlib.uuid4()), name=req.name, namespace=ns, netblock=str(net),
                provide_dhcp=req.provide_dhcp, provide_nat=req.provide_nat,
                provide_dns=req.provide_dns, vxlan_id=random.randint(1, 2**24 - 1),
                state=NET.Value('NETWORK_STATE_CREATED'), version=1)
            txn = Txn().create(keys.network_name(ns, req.name), network.uuid.encode())
            if req.provide_nat:
                network.floating_gateway = str(self._random_free(self.floating, self._floating_used(txn)))
                txn.create(keys.floating(network.floating_gateway), network.uuid.encode())
            txn.put(keys.network(ns, network.uuid), network.SerializeToString())
            self.core.event(txn, ns, OBJ_NETWORK, network.uuid, AUDIT, 'create request from API')
            return txn, api.CreateNetworkResponse(network=network)
        return await self.core.mutate(build, request=req)

    def view(self, network: pb.Network) -> pb.Network:
        """The network as shown: the record and where it is served and carried now."""
        shown = pb.Network()
        shown.CopyFrom(network)
        served, mesh = meshes.served_by(self.core.cache, network)
        shown.served_by.extend(served)
        shown.mesh_nodes.extend(mesh)
        return shown

    def list(self, req: api.ListNetworksRequest) -> api.ListNetworksResponse:
        me = caller.current()
        prefix = keys.networks('' if me.is_system else me.namespace)
        deleted = NET.Value('NETWORK_STATE_DELETED')
        page, more = self.core.cache.range(
            prefix, start_after=req.page_token or None, limit=req.page_size or DEFAULT_PAGE,
            filter=None if req.all else (lambda n: n.state != deleted))
        return api.ListNetworksResponse(networks=[self.view(e.value) for e in page],
                                        next_page_token=page[-1].key if more else '')

    async def delete(self, req: api.DeleteNetworkRequest) -> api.DeleteNetworkResponse:
        entry = self.resolve(req.network_ref, req.namespace if req.HasField('namespace') else None)

        def build():
            current = self.core.cache.get(entry.key)
            network = current.value
            if network.state == NET.Value('NETWORK_STATE_DELETED'):
                raise errors.NotFound('network not found')
            txn = Txn().check_revision(current.key, current.mod_revision)
            self._delete_network(txn, network)
            return txn, api.DeleteNetworkResponse(network=network)
        return await self.core.mutate(build, request=req)

    def _delete_network(self, txn: Txn, network: pb.Network):
        in_use = self.interfaces_on(network.uuid)
        if in_use:
            raise errors.StateConflict(f'network {network.uuid} is in use by {len(in_use)} interfaces')
        gone = pb.Network()
        gone.CopyFrom(network)
        gone.state = NET.Value('NETWORK_STATE_DELETED')
        txn.put(keys.network(network.namespace, network.uuid), gone.SerializeToString())
        txn.delete(keys.network_name(network.namespace, network.name))
        if network.HasField('floating_gateway'):
            txn.delete(keys.floating(network.floating_gateway))
        self.core.event(txn, network.namespace, OBJ_NETWORK, network.uuid, AUDIT,
                        'delete request from API')

    async def delete_all(self, req: api.DeleteAllNetworksRequest):
        ns = caller.delete_all_scope(req)

        def build():
            txn, uuids = Txn(), []
            live, _ = self.core.cache.range(
                keys.networks(ns), filter=lambda n: n.state != NET.Value('NETWORK_STATE_DELETED'))
            for entry in live:
                txn.check_revision(entry.key, entry.mod_revision)
                self._delete_network(txn, entry.value)
                uuids.append(entry.value.uuid)
            return txn, api.DeleteAllNetworksResponse(network_uuids=uuids)
        return await self.core.mutate(build, request=req)

    # -- interfaces and addresses ----------------------------------------------
    # The address, MAC and floating address in use are read untracked: they only pick a
    # free value, and the guard keys (create-if-absent) make the pick safe.
    def _used(self, network_uuid: str) -> set[str]:
        with untracked():
            found = self.core.cache.where(keys.INTERFACES, 'network_uuid', network_uuid)
        return {e.value.ipv4 for e in found if e.value.HasField('ipv4')
                and e.value.state != IFACE.Value('NETWORK_INTERFACE_STATE_DELETED')}

    def new_interface(self, txn: Txn, spec: specs_pb2.NetworkSpec, instance_uuid: str,
                      order: int, ns: str) -> pb.NetworkInterface:
        """Allocate an interface (address, MAC) into txn. Guards make the allocation safe
        against concurrent controllers: a clash fails the transaction, which is retried."""
        entry = self.resolve(spec.network_uuid, ns)
        network = entry.value
        if network.namespace != ns:
            raise errors.NotFound('network not found')
        if network.state != NET.Value('NETWORK_STATE_CREATED'):
            raise errors.NotReady(f'network {network.uuid} is not ready ({pb.NetworkState.Name(network.state)})')
        net = ipaddress.IPv4Network(network.netblock)
        iface = pb.NetworkInterface(
            uuid=str(uuidlib.uuid4()), state=IFACE.Value('NETWORK_INTERFACE_STATE_INITIAL'),
            version=1, network_uuid=network.uuid, instance_uuid=instance_uuid, order=order,
            model=spec.model or specs_pb2.NIC_MODEL_VIRTIO)
        # Addresses this transaction already takes (earlier interfaces of one request) count too.
        used = self._used(network.uuid) | _pending(txn, keys.address(network.uuid, ''))
        if not spec.HasField('address'):
            iface.ipv4 = str(self._random_free(net, used))
        elif spec.address != 'none':
            try:
                address = ipaddress.IPv4Address(spec.address)
            except ValueError:
                raise errors.InvalidArgument(f'address {spec.address} is not an IPv4 address')
            if not _assignable(net, address):
                raise errors.InvalidArgument(f'address {address} is not in the range of network {network.uuid}')
            if str(address) in used:
                raise errors.AlreadyExists(f'address {address} is already in use')
            iface.ipv4 = str(address)
        if iface.HasField('ipv4'):
            txn.create(keys.address(network.uuid, iface.ipv4), iface.uuid.encode())
        macs = _pending(txn, keys.mac(''))
        if spec.HasField('macaddress'):
            if spec.macaddress in macs or self._mac_in_use(spec.macaddress):
                raise errors.AlreadyExists(f'mac address {spec.macaddress} is already in use')
            iface.macaddr = spec.macaddress
        else:
            # A clash with a committed MAC fails the guard and the build is retried.
            iface.macaddr = _random_mac()
            while iface.macaddr in macs:
                iface.macaddr = _random_mac()
        txn.create(keys.mac(iface.macaddr), iface.uuid.encode())
        if spec.float:
            self._float_into(txn, iface)
        txn.put(keys.interface(iface.uuid), iface.SerializeToString())
        return iface

    def _mac_in_use(self, macaddr: str) -> bool:
        with untracked():
            found = self.core.cache.range(keys.INTERFACES)[0]
        return any(e.value.macaddr == macaddr
                   and e.value.state != IFACE.Value('NETWORK_INTERFACE_STATE_DELETED') for e in found)

    def release_interface(self, txn: Txn, iface: pb.NetworkInterface):
        """Delete an interface and free its address, MAC and floating address."""
        gone = pb.NetworkInterface()
        gone.CopyFrom(iface)
        gone.state = IFACE.Value('NETWORK_INTERFACE_STATE_DELETED')
        if iface.HasField('ipv4'):
            txn.delete(keys.address(iface.network_uuid, iface.ipv4))
        if iface.HasField('floating'):
            txn.delete(keys.floating(iface.floating))
            gone.ClearField('floating')
        txn.delete(keys.mac(iface.macaddr))
        txn.put(keys.interface(iface.uuid), gone.SerializeToString())

    def _random_free(self, net, used):
        hosts = net.num_addresses - 3
        if hosts - len(used) <= 0:
            raise errors.InsufficientResources(f'network {net} has no free addresses')
        for _ in range(64):
            address = net.network_address + random.randint(2, net.num_addresses - 2)
            if _assignable(net, address) and str(address) not in used:
                return address
        for address in net.hosts():       # nearly full: search in order
            if _assignable(net, address) and str(address) not in used:
                return address
        raise errors.InsufficientResources(f'network {net} has no free addresses')

    def _floating_used(self, txn: Txn) -> set[str]:
        with untracked():
            interfaces, networks = (self.core.cache.range(keys.INTERFACES)[0],
                                    self.core.cache.range(keys.NETWORKS)[0])
        used = {e.value.floating for e in interfaces if e.value.HasField('floating')}
        used |= {e.value.floating_gateway for e in networks if e.value.HasField('floating_gateway')}
        return used | _pending(txn, keys.floating(''))

    def _float_into(self, txn: Txn, iface: pb.NetworkInterface):
        iface.floating = str(self._random_free(self.floating, self._floating_used(txn)))
        txn.create(keys.floating(iface.floating), iface.uuid.encode())

    async def float(self, req, floating: bool):
        entry = self.interface(req.interface_uuid)

        def build():
            current = self.core.cache.get(entry.key)
            iface = pb.NetworkInterface()
            iface.CopyFrom(current.value)
            if iface.state == IFACE.Value('NETWORK_INTERFACE_STATE_DELETED'):
                raise errors.NotFound('interface not found')
            txn = Txn().check_revision(current.key, current.mod_revision)
            if floating and not iface.HasField('floating'):
                self._float_into(txn, iface)
            elif not floating and iface.HasField('floating'):
                txn.delete(keys.floating(iface.floating))
                iface.ClearField('floating')
            txn.put(current.key, iface.SerializeToString())
            inst = self.core.cache.by_uuid(keys.INSTANCES, iface.instance_uuid).value
            self.core.event(txn, inst.namespace, OBJ_IFACE, iface.uuid, AUDIT,
                            'float request from API' if floating else 'defloat request from API')
            response = api.FloatInterfaceResponse() if floating else api.DefloatInterfaceResponse()
            return txn, response
        return await self.core.mutate(build, request=req)


def _pending(txn: Txn, prefix: str) -> set[str]:
    """The key suffixes under prefix that txn already writes: guards it takes but has not
    committed, which the cache cannot show (etcd refuses a key twice in one transaction)."""
    return {op[1][len(prefix):] for op in txn.ops if op[0] == 'put' and op[1].startswith(prefix)}


def _random_mac() -> str:
    return '02:00:00:%02x:%02x:%02x' % tuple(random.randint(0, 255) for _ in range(3))

