"""Follows the node's desired networks (WatchDesiredNetworks) and converges the
mesh and, on a network node, DHCP and DNS, NAT egress and floating addresses
(sfnode/network/nat.py) to them.

One converging task takes the networks whose desired state changed, in turn; a
failure is logged and retried with backoff, never given up. When the first
listing is complete, what exists but is no longer desired (a VXLAN, a DHCP
namespace, dnsmasq: found by the node's prefix) is removed."""

import asyncio
import logging
import pathlib

import grpc

from sfcommon.backoff import Backoff
from sfcommon.events import make_event
from sfnode.network.dhcp import Dhcp
from sfnode.network.leases import LeaseListener
from sfnode.network.mesh import Mesh, MeshConfig
from sfnode.network.nat import Nat
from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.v1 import event_pb2

log = logging.getLogger(__name__)


class Carrier:
    def __init__(self, node, mesh: MeshConfig, network_node: bool, edge: str | None = None):
        self.node = node
        self.enabled = bool(mesh.address)
        self.network_node = network_node
        self.mesh = Mesh(node.config.bridge_prefix, mesh)
        self.leases = LeaseListener(pathlib.Path(node.state_dir) / 'leases.sock')
        self.dhcp = Dhcp(node.config.bridge_prefix, pathlib.Path(node.state_dir) / 'networks',
                         self.leases.path if network_node and self.leases.usable else None)
        self.nat = Nat(node.config.bridge_prefix, edge)
        self.desired: dict[str, pb.DesiredNetwork] = {}
        self._vni: dict[str, int] = {}              # network uuid -> VNI, of what was made
        self._served: set[str] = set()
        self._natted: set[str] = set()
        self._no_edge: set[str] = set()            # NAT wanted without an edge: said once
        self._floating: dict[str, dict[str, str]] = {}     # network uuid -> floating -> interface uuid
        self._peers: dict[str, list[str]] = {}      # network uuid -> peers, as last made
        self._pending: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._sweep = False
        self.synced = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self):
        if self.enabled:
            self._tasks = [asyncio.create_task(self._follow(), name='networks-follow'),
                           asyncio.create_task(self._converge(), name='networks-converge')]
            if self.network_node and await self.leases.start():
                self._tasks.append(asyncio.create_task(self._lease_events(), name='networks-leases'))

    async def stop(self, remove: bool = False):
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.leases.stop()
        if remove:
            for vni in await self.nat.orphans():
                await self.nat.remove(self.dhcp.namespace(vni), vni)
            for vni in await self.dhcp.present():
                await self.dhcp.remove(vni)
            for vni in await self.mesh.present():
                await self.mesh.remove(vni)

    def in_use(self) -> set[str]:
        return set(self.desired)

    def _mark(self, uuid: str):
        self._pending[uuid] = None
        self._wake.set()

    async def _follow(self):
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                stream = self.node.link.control.WatchDesiredNetworks(
                    pb.WatchDesiredNetworksRequest(name=self.node.name))
                listed = set()
                async for change in stream:
                    backoff.reset()
                    kind = change.WhichOneof('change')
                    if kind == 'upsert':
                        uuid = change.upsert.network.uuid
                        listed.add(uuid)
                        self.desired[uuid] = change.upsert
                        self._mark(uuid)
                    elif kind == 'remove_uuid':
                        self.desired.pop(change.remove_uuid, None)
                        self._mark(change.remove_uuid)
                    else:
                        for uuid in set(self.desired) - listed:
                            del self.desired[uuid]
                            self._mark(uuid)
                        self._sweep = True
                        self._wake.set()
            except grpc.aio.AioRpcError as e:
                log.warning('desired-networks stream lost (%s); reconnecting', e.code().name)
            await backoff.sleep()

    async def _converge(self):
        backoff = Backoff(0.2, 10.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while self._pending:
                    uuid = next(iter(self._pending))
                    del self._pending[uuid]     # first: a change while it converges marks it again
                    try:
                        await self._one(uuid)
                    except BaseException:
                        self._pending[uuid] = None
                        raise
                if self._sweep:
                    await self._remove_orphans()
                    self._sweep = False
                    if not self.synced.is_set():
                        log.info('networks synced', extra={'networks': len(self.desired)})
                    self.synced.set()
                backoff.reset()
            except Exception:
                log.exception('converging networks failed; retrying')
                await backoff.sleep()
                self._wake.set()

    async def _one(self, uuid: str):
        desired = self.desired.get(uuid)
        if desired is None:
            vni = self._vni.pop(uuid, None)
            if vni is not None:
                await self.nat.remove(self.dhcp.namespace(vni), vni)
                await self.dhcp.remove(vni)
                self._natted.discard(uuid)
                await self._floated(uuid, {})
                await self.mesh.remove(vni)
                self._served.discard(uuid)
                self._peers.pop(uuid, None)
            await self.node.bridges.release_unused()
            return
        network = desired.network
        self._vni[uuid] = network.vxlan_id
        bridge = await self.node.bridges.ensure(network)
        await self.mesh.ensure(network.vxlan_id, bridge, list(desired.peers))
        peers = sorted(desired.peers)
        if self._peers.get(uuid) != peers:
            self._peers[uuid] = peers
            await self._event(network.uuid, f'mesh on {self.node.name}: peers {", ".join(peers) or "none"}',
                              {'node': self.node.name, 'peers': peers})
        had_namespace = uuid in self._served or uuid in self._natted
        if desired.serve:
            started = await self.dhcp.ensure(network, bridge, desired.hosts)
            if started or uuid not in self._served:
                self._served.add(uuid)
                await self._event(network.uuid, f'network served by {self.node.name}: DHCP and DNS',
                                  {'node': self.node.name, 'started': started})
        elif uuid in self._served:
            await self.dhcp.stop_dnsmasq(network.vxlan_id)
            self._served.discard(uuid)
        nat = desired.nat and bool(self.nat.edge)
        if desired.nat and not self.nat.edge and uuid not in self._no_edge:
            self._no_edge.add(uuid)
            log.warning('network wants NAT but this network node has no edge namespace (--edge-namespace)',
                        extra={'network': uuid})
        if nat:
            ns = await self.dhcp.plumb(network, bridge)
            floats = {f.floating: f.ipv4 for f in desired.floating}
            added, _ = await self.nat.ensure(ns, network, desired.floating_netblock, floats)
            if uuid not in self._natted:
                self._natted.add(uuid)
                if network.provide_nat:
                    await self._event(network.uuid, f'network NAT on {self.node.name}: egress as {network.floating_gateway}',
                                      {'node': self.node.name, 'egress': network.floating_gateway})
                else:
                    await self._event(network.uuid, f'floating addresses on {self.node.name} (no NAT egress)',
                                      {'node': self.node.name})
            now = {f.floating: f.interface_uuid for f in desired.floating}
            if uuid not in self._floating:      # a restart: what the kernel already had is not news
                self._floating[uuid] = {f: i for f, i in now.items() if f not in added}
            await self._floated(uuid, now)
        elif uuid in self._natted:
            await self.nat.remove(self.dhcp.namespace(network.vxlan_id), network.vxlan_id)
            self._natted.discard(uuid)
            await self._floated(uuid, {})
        if had_namespace and not desired.serve and not nat:
            await self.dhcp.remove(network.vxlan_id)

    async def _floated(self, uuid: str, now: dict[str, str]):
        """Floated and defloated events on the interfaces whose floating address came or
        went, and on their network."""
        before = self._floating.get(uuid, {})
        self._floating[uuid] = now
        changes = [('floated', f, i) for f, i in now.items() if before.get(f) != i]
        changes += [('defloated', f, i) for f, i in before.items() if now.get(f) != i]
        for verb, floating, iface in changes:
            extra = {'node': self.node.name, 'floating': floating}
            await self._iface_event(iface, f'{verb}: {floating} on {self.node.name}', extra)
            await self._event(uuid, f'{verb}: {floating} (interface {iface}) on {self.node.name}',
                              {**extra, 'interface': iface})

    async def _remove_orphans(self):
        wanted = {d.network.vxlan_id for d in self.desired.values()}
        natted = {d.network.vxlan_id for d in self.desired.values() if d.nat and self.nat.edge}
        served = {d.network.vxlan_id for d in self.desired.values() if d.serve} | natted
        for vni in await self.nat.orphans() - natted:
            log.info('removing orphan NAT', extra={'vni': vni})
            await self.nat.remove(self.dhcp.namespace(vni), vni)
        for vni in await self.dhcp.present() - served:
            log.info('removing orphan network services', extra={'vni': vni})
            await self.dhcp.remove(vni)
        for vni in set(await self.mesh.present()) - wanted:
            log.info('removing orphan vxlan', extra={'vni': vni})
            await self.mesh.remove(vni)
        await self.node.bridges.release_orphans()

    async def _lease_events(self):
        """Each lease dnsmasq gives or lets go, as an event on its network."""
        while True:
            lease = await self.leases.queue.get()
            network = next((d.network for d in self.desired.values() if d.network.vxlan_id == lease['vni']), None)
            if network is None:
                continue
            name = f' ({lease["hostname"]})' if lease['hostname'] else ''
            what = (f'DHCP lease given: {lease["ipv4"]} to {lease["mac"]}{name}' if lease['action'] == 'add'
                    else f'DHCP lease ended: {lease["ipv4"]} of {lease["mac"]}{name}')
            try:
                await self._event(network.uuid, f'{what} on {self.node.name}', {'node': self.node.name, **lease})
            except grpc.aio.AioRpcError as e:
                log.warning('lease event not recorded (%s)', e.code().name)

    async def _iface_event(self, iface: str, message: str, extra: dict):
        await self.node.link.record(make_event(self.node.name, event_pb2.OBJECT_TYPE_NETWORK_INTERFACE, iface,
                                               event_pb2.EVENT_TYPE_STATUS, message, extra))

    async def _event(self, network_uuid: str, message: str, extra: dict):
        await self.node.link.record(make_event(self.node.name, event_pb2.OBJECT_TYPE_NETWORK, network_uuid,
                                               event_pb2.EVENT_TYPE_STATUS, message, extra))
