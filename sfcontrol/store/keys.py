"""The etcd key layout. Every key is relative to the store prefix (/sf by default).

Objects, stored as their protobuf messages and mirrored in memory by the
ObjectCache (cached=True below):

  namespaces/<ns>                        shakenfist.v1.Namespace
  namespace-keys/<ns>/<key name>         store.v1alpha1.NamespaceKeyRecord (hash only)
  instances/<ns>/<uuid>                  shakenfist.v1.Instance
  networks/<ns>/<uuid>                   shakenfist.v1.Network
  interfaces/<uuid>                      shakenfist.v1.NetworkInterface
  agentops/<uuid>                        shakenfist.v1.AgentOperation
  nodes/<name>                           store.v1alpha1.NodeRecord
  placements/<node>/<instance uuid>      store.v1alpha1.Placement (what the node watches)
  blobs/<uuid>                           shakenfist.v1.Blob (bytes on its holders, below)
  blob-refs/<blob>/<holder type>/<uuid>  store.v1alpha1.BlobRef (a blob lives while held)
  uploads/<uuid>                         shakenfist.v1.Upload
  artifacts/<ns>/<uuid>                  shakenfist.v1.Artifact
  token-keys/<kid>                       store.v1alpha1.TokenKeyRecord (signs tokens)

Bound to a controller's etcd lease, so they go when it does (sfcontrol/replicas.py):

  blob-holders/<holder>                  store.v1alpha1.BlobHolderRecord (a controller holding blob bytes)
  blob-locations/<blob>/<holder>         store.v1alpha1.BlobLocation (that holder has the blob's bytes)

Guards, written with create-if-absent in the same transaction as the object
they protect, so that two controllers cannot both take one:

  network-names/<ns>/<name>              network uuid
  addresses/<network uuid>/<ipv4>        interface uuid
  macs/<mac>                             interface uuid
  floating/<ipv4>                        interface uuid
  vsock-cids/<cid>                       instance uuid (the agent's vsock address)

Written only to be seen passing by in the cache's watch (ObjectCache.wait_for):

  revision-mark                          empty

Not cached (read from etcd when asked for):

  events/<ns>/<object type>/<object uuid>/<seq>   shakenfist.v1.Event; seq sorts by time
  requests/<ns>/<request id>             store.v1alpha1.RequestRecord (AIP-155 idempotency)
"""

import os
import time


# The prefix of each kind of object.
NAMESPACES = 'namespaces/'
NAMESPACE_KEYS = 'namespace-keys/'
INSTANCES = 'instances/'
NETWORKS = 'networks/'
INTERFACES = 'interfaces/'
AGENTOPS = 'agentops/'
NODES = 'nodes/'
PLACEMENTS = 'placements/'
BLOBS = 'blobs/'
BLOB_REFS = 'blob-refs/'
UPLOADS = 'uploads/'
ARTIFACTS = 'artifacts/'
TOKEN_KEYS = 'token-keys/'
BLOB_HOLDERS = 'blob-holders/'
BLOB_LOCATIONS = 'blob-locations/'
EVENTS = 'events/'


def namespace(ns): return f'namespaces/{ns}'
def namespace_key(ns, name): return f'namespace-keys/{ns}/{name}'
def namespace_keys(ns): return f'namespace-keys/{ns}/'
def instance(ns, uuid): return f'instances/{ns}/{uuid}'
def instances(ns=''): return f'instances/{ns}/' if ns else INSTANCES
def network(ns, uuid): return f'networks/{ns}/{uuid}'
def networks(ns=''): return f'networks/{ns}/' if ns else NETWORKS
def network_name(ns, name): return f'network-names/{ns}/{name}'
def interface(uuid): return f'interfaces/{uuid}'
def agentop(uuid): return f'agentops/{uuid}'
def node(name): return f'nodes/{name}'
def placement(node_name, uuid): return f'placements/{node_name}/{uuid}'
def placements(node_name): return f'placements/{node_name}/'
def address(network_uuid, ipv4): return f'addresses/{network_uuid}/{ipv4}'
def mac(macaddr): return f'macs/{macaddr}'
def floating(ipv4): return f'floating/{ipv4}'
def request(ns, request_id): return f'requests/{ns}/{request_id}'
def vsock_cid(cid): return f'vsock-cids/{cid}'
def token_key(kid): return f'token-keys/{kid}'
def blob(uuid): return f'blobs/{uuid}'
def blob_refs(blob_uuid): return f'blob-refs/{blob_uuid}/'
def blob_ref(blob_uuid, holder_type, holder): return f'blob-refs/{blob_uuid}/{holder_type}/{holder}'
def blob_holder(holder): return f'blob-holders/{holder}'
def blob_locations(blob_uuid): return f'blob-locations/{blob_uuid}/'
def blob_location(blob_uuid, holder): return f'blob-locations/{blob_uuid}/{holder}'
def upload(uuid): return f'uploads/{uuid}'
def artifact(ns, uuid): return f'artifacts/{ns}/{uuid}'
def artifacts(ns): return f'artifacts/{ns}/'
REVISION_MARK = 'revision-mark'
LEGACY_TOKEN_SECRET = 'config/token-secret'     # before signing keys had ids; removed at start


def events(ns='', object_type='', uuid=''):
    """The prefix of events, narrowed by whichever parts are given, left to right."""
    parts = ['events', ns, object_type, uuid]
    prefix = []
    for p in parts:
        if not p:
            break
        prefix.append(p)
    return '/'.join(prefix) + '/'


def event(ns, object_type, uuid):
    """A new event key: the sequence part sorts by time, then at random."""
    return f'events/{ns}/{object_type}/{uuid}/{time.time_ns():020d}-{os.urandom(3).hex()}'
