"""The controller's metrics (its gRPC requests are sfcommon.metrics.ServerMetrics').

    sf_controller_store_transactions_total{outcome}   Store.commit: committed, conflict, error
    sf_controller_store_transaction_seconds           the same, timed
    sf_controller_watches_open{kind}                  events (WatchEvents), node_desired_state
    sf_controller_instances{state}                    from the object cache, at scrape time
"""

import collections
import operator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from sfcommon import metrics, states
from sfcontrol.store import keys
from shakenfist.v1 import instance_pb2

STORE_TRANSACTIONS = Counter(
    'sf_controller_store_transactions_total',
    'etcd transactions (Store.commit) by outcome: committed; conflict (a check failed, so '
    'the change is rebuilt or refused); error (etcd unreachable or refusing)', ['outcome'])
TXN_COMMITTED = STORE_TRANSACTIONS.labels('committed')
TXN_CONFLICT = STORE_TRANSACTIONS.labels('conflict')
TXN_ERROR = STORE_TRANSACTIONS.labels('error')
STORE_TRANSACTION_SECONDS = Histogram(
    'sf_controller_store_transaction_seconds', 'Time for etcd to answer a transaction',
    buckets=metrics.LATENCY_BUCKETS)

WATCHES_OPEN = Gauge(
    'sf_controller_watches_open', 'Open watches: events (WatchEvents streams, one etcd watch '
    "each), node_desired_state (nodes' WatchDesiredInstances feeds, listeners on the cache)",
    ['kind'])
EVENT_WATCHES = WATCHES_OPEN.labels('events')
NODE_FEEDS = WATCHES_OPEN.labels('node_desired_state')

#: Object caches (sfcontrol.store.cache.ObjectCache) of the running controllers.
caches = metrics.Live()

_STATES = [(v.number, states.name(v.number))
           for v in instance_pb2.InstanceState.DESCRIPTOR.values if v.number]
_state_of = operator.attrgetter('state')


class _InstancesByState(Collector):
    """Instances in each state, counted in the cache when scraped: nothing to keep up to
    date. Every state is reported, zeros included."""

    def describe(self):
        return [self._family()]

    @staticmethod
    def _family():
        return GaugeMetricFamily('sf_controller_instances',
                                 'Instances in each lifecycle state, deleted ones included',
                                 labels=['state'])

    def collect(self):
        counts = collections.Counter()
        for cache in caches:
            counts.update(cache.count(keys.INSTANCES, _state_of))
        family = self._family()
        for number, name in _STATES:
            family.add_metric([name], counts.get(number, 0))
        yield family


REGISTRY.register(_InstancesByState())
