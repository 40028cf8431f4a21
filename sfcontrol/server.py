"""Assemble and run the controller: one grpc.aio server with reflection and health."""

import dataclasses
import logging
import os
import pathlib
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sfcommon.clock import SYSTEM, Clock
from sfcommon.listen import refuse_plaintext
from sfcommon.metrics import MetricsServer, ServerMetrics, start_metrics_server
from sfcommon.pki import Bundle, EtcdTls
from sfcommon.urlpolicy import ImagePolicy
from sfcontrol import blobs as blobs_module, metrics as controller_metrics, reflection, services
from sfcontrol.agentops import AgentOperations
from sfcontrol.auth import Auth
from sfcontrol.blobs import Blobs
from sfcontrol.core import Core
from sfcontrol.events import Events
from sfcontrol.interceptor import ApiInterceptor
from sfcontrol.metadata import Metadata
from sfcontrol.networks import Networks
from sfcontrol.nodeapi import NodeControl
from sfcontrol.nodeclient import NodeClients
from sfcontrol.nodes import NodeRegistry, NodeReports
from sfcontrol.replicas import BlobPeerService
from sfcontrol.instances import Consoles, Instances, Power, Snapshots
from sfcontrol.store.etcd import Store
from shakenfist.node.v1alpha1 import node_pb2, node_pb2_grpc
from shakenfist.peer.v1alpha1 import blob_peer_pb2, blob_peer_pb2_grpc
from shakenfist.v1 import (agent_operation_service_pb2, agent_operation_service_pb2_grpc,
                           blob_service_pb2, blob_service_pb2_grpc,
                           auth_service_pb2, auth_service_pb2_grpc, event_service_pb2,
                           event_service_pb2_grpc, instance_service_pb2,
                           instance_service_pb2_grpc, network_service_pb2,
                           network_service_pb2_grpc, server_service_pb2,
                           server_service_pb2_grpc)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Config:
    """Controller settings; each has a flag and an SF_* environment variable (main.py)."""
    etcd_endpoints: list[str]
    listen: str = '127.0.0.1:0'             # the public API
    node_listen: str = '127.0.0.1:0'        # the node API (mutual TLS)
    pki: Bundle | None = None           # ca.pem, controller.pem/.key; None: no node API
    etcd_tls: EtcdTls | None = None     # etcd's CA and this controller's client certificate
    tls_cert: pathlib.Path | None = None    # the public API's certificate and key; without
    tls_key: pathlib.Path | None = None     # them it listens in plaintext on loopback only
    state_dir: pathlib.Path = pathlib.Path('/var/lib/shakenfist')
    store_prefix: str = '/sf'
    token_ttl: int = 900
    floating_netblock: str = '198.51.100.0/24'
    image_allow: tuple[str, ...] = ()       # URL prefixes tenants may use though local or internal
    max_blob_size: int = blobs_module.DEFAULT_MAX_BLOB_SIZE     # bytes of one blob or upload
    namespace_quota: int = blobs_module.DEFAULT_NAMESPACE_QUOTA  # bytes of blobs a namespace holds
    # host:port where other controllers reach this one's node port (blob copies, replicas.py);
    # '': node_listen's host (this host's name if that listens on every address).
    peer_address: str = ''
    blob_copies: int = blobs_module.COPIES      # controllers holding each blob, when that many live
    blob_holder_ttl: int = blobs_module.HOLDER_TTL  # seconds a dead controller still holds blobs
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 20.0
    clock: Clock = SYSTEM       # deadlines, heartbeats and token expiry; tests pass a ManualClock
    metrics_listen: str | None = None       # host:port of GET /metrics (plain HTTP); None: off


@dataclasses.dataclass
class Controller:
    server: grpc.aio.Server
    port: int
    node_port: int
    core: Core
    auth: Auth
    agentops: AgentOperations
    node_control: NodeControl
    nodes: NodeClients
    registry: NodeRegistry
    metrics: MetricsServer | None = None    # with Config.metrics_listen
    blobs: Blobs | None = None

    async def stop(self, grace: float | None = 1.0, *, hand_off: bool = True):
        """Stop. Without hand_off this controller leaves as a dead one does: the others
        notice it is gone when its lease expires (tests of a lost controller)."""
        if self.blobs is not None:
            await self.blobs.replicas.stop(hand_off)
        if self.metrics is not None:
            await self.metrics.close()
        controller_metrics.caches.discard(self.core.cache)
        await self.server.stop(grace)
        await self.agentops.stop()      # their timers and what those started
        await self.registry.stop()
        await self.nodes.close()
        await self.core.close()
        await self.core.store.close()


def _public_port(server: grpc.aio.Server, config: Config) -> int:
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(pathlib.Path(config.tls_key).read_bytes(), pathlib.Path(config.tls_cert).read_bytes())])
        return server.add_secure_port(config.listen, credentials)
    refuse_plaintext('the public API', config.listen)
    return server.add_insecure_port(config.listen)


def _node_port(server: grpc.aio.Server, config: Config) -> int:
    """The node API's port: mutual TLS with the cluster CA (see sfcommon/pki.py)."""
    if config.pki is None:
        log.warning('no certificates (--pki-dir): nodes cannot connect to this controller')
        return 0
    ca, cert, key = config.pki.read()
    return server.add_secure_port(config.node_listen, grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True))


def _peer_address(config: Config, node_port: int) -> str:
    """Where other controllers reach this one's BlobPeerService ('' without a node port)."""
    if not node_port:
        return ''
    if config.peer_address:
        return config.peer_address
    host = config.node_listen.rsplit(':', 1)[0].strip('[]')
    if host in ('', '0.0.0.0', '::'):
        host = socket.getfqdn()
    return f'[{host}]:{node_port}' if ':' in host else f'{host}:{node_port}'


async def start(config: Config) -> Controller:
    store = await Store.connect(config.etcd_endpoints, prefix=config.store_prefix,
                                tls=config.etcd_tls)
    core = await Core.open(store)
    auth = await Auth.start(core, config.state_dir, config.token_ttl, config.clock.now)
    nodes = NodeClients(core.cache, config.pki)
    blobs = Blobs(core, pathlib.Path(config.state_dir) / 'blobs', config.max_blob_size,
                  config.namespace_quota, config.pki, config.blob_copies, config.blob_holder_ttl)
    blobs.start()
    networks = Networks(core, config.floating_netblock)
    events = Events(core)
    instances = Instances(core, networks, nodes, events, blobs, ImagePolicy(config.image_allow))
    agentops = AgentOperations(core, instances, nodes, config.clock)
    agentops.start()
    registry = NodeRegistry(core, config.clock, config.heartbeat_interval, config.heartbeat_timeout,
                            config.floating_netblock)
    registry.start()
    snapshots = Snapshots(instances)
    node_control = NodeControl(registry, NodeReports(core, instances, agentops, blobs, auth, snapshots))
    metadata = Metadata(core)

    # ServerMetrics first: it sees the status ApiInterceptor answers with.
    server = grpc.aio.server(interceptors=[ServerMetrics(), ApiInterceptor(lambda: auth)], options=[
        ('grpc.max_receive_message_length', 16 * 1024 * 1024)])
    instance_service_pb2_grpc.add_InstanceServiceServicer_to_server(
        services.InstanceService(instances, Power(instances), Consoles(instances), snapshots), server)
    network_service_pb2_grpc.add_NetworkServiceServicer_to_server(
        services.NetworkService(networks, metadata), server)
    network_service_pb2_grpc.add_InterfaceServiceServicer_to_server(
        services.InterfaceService(networks, metadata), server)
    agent_operation_service_pb2_grpc.add_AgentOperationServiceServicer_to_server(
        services.AgentOperationService(agentops), server)
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(services.AuthService(auth), server)
    event_service_pb2_grpc.add_EventServiceServicer_to_server(
        services.EventService(instances, events), server)
    server_service_pb2_grpc.add_ServerServiceServicer_to_server(services.ServerService(), server)
    node_pb2_grpc.add_NodeControlServiceServicer_to_server(node_control, server)
    blob_service_pb2_grpc.add_BlobServiceServicer_to_server(services.BlobService(blobs), server)
    blob_service_pb2_grpc.add_UploadServiceServicer_to_server(services.UploadService(blobs), server)
    blob_service_pb2_grpc.add_ArtifactServiceServicer_to_server(services.ArtifactService(blobs), server)
    blob_peer_pb2_grpc.add_BlobPeerServiceServicer_to_server(BlobPeerService(blobs.replicas), server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [m.DESCRIPTOR.services_by_name[s].full_name for m, s in [
        (instance_service_pb2, 'InstanceService'), (network_service_pb2, 'NetworkService'),
        (network_service_pb2, 'InterfaceService'),
        (agent_operation_service_pb2, 'AgentOperationService'),
        (auth_service_pb2, 'AuthService'), (event_service_pb2, 'EventService'),
        (server_service_pb2, 'ServerService'), (node_pb2, 'NodeControlService'),
        (blob_service_pb2, 'BlobService'), (blob_service_pb2, 'UploadService'),
        (blob_service_pb2, 'ArtifactService'), (blob_peer_pb2, 'BlobPeerService')]]
    # From the generated descriptor set, so that describe shows the .proto comments.
    reflection.enable(server, names + [health_pb2.DESCRIPTOR.services_by_name['Health'].full_name])
    port = _public_port(server, config)
    node_port = _node_port(server, config)
    await server.start()
    await blobs.replicas.start(_peer_address(config, node_port))
    await health_servicer.set('', health_pb2.HealthCheckResponse.SERVING)
    controller_metrics.caches.add(core.cache)
    metrics = await start_metrics_server(config.metrics_listen) if config.metrics_listen else None
    log.info('controller listening', extra={'port': port, 'node_port': node_port, 'pid': os.getpid(),
                                            'metrics': metrics.url if metrics else None})
    return Controller(server, port, node_port, core, auth, agentops, node_control, nodes, registry,
                      metrics, blobs)
