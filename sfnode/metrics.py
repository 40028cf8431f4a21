"""The node's metrics (its gRPC calls to the controller, and the controller's to it,
are sfcommon.metrics'):

    sf_node_convergence_seconds{kind}       a desired-state change arriving -> the domain
                                            matching it: build, update, remove
    sf_node_instances{node, power_state}    the node's instances, when scraped
"""

import collections
import time

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from sfcommon import metrics
from shakenfist.v1 import instance_pb2, wire_pb2

CONVERGENCE_SECONDS = Histogram(
    'sf_node_convergence_seconds',
    'Time from a desired-state change reaching the node to its domain matching it (retries '
    'of failed steps included): build (a new instance, up to created and its power state), '
    'update (a change to one built), remove (to the domain gone)', ['kind'],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
             300.0, 600.0))
BUILD = CONVERGENCE_SECONDS.labels('build')
UPDATE = CONVERGENCE_SECONDS.labels('update')
REMOVE = CONVERGENCE_SECONDS.labels('remove')


def converged(histogram, since: float | None):
    """Observe the time since since (time.perf_counter()), if a change was pending."""
    if since is not None:
        histogram.observe(time.perf_counter() - since)


#: The running nodes (sfnode.node.Node) of this process.
nodes = metrics.Live()

_POWER = [(v.number, v.GetOptions().Extensions[wire_pb2.wire_value] or 'unknown')
          for v in instance_pb2.PowerState.DESCRIPTOR.values]


class _InstancesByPower(Collector):
    """Each node's instances (those not being removed) by the power state it last saw,
    counted when scraped. unknown: no domain yet."""

    def describe(self):
        return [self._family()]

    @staticmethod
    def _family():
        return GaugeMetricFamily('sf_node_instances', "The node's instances by power state",
                                 labels=['node', 'power_state'])

    def collect(self):
        family = self._family()
        for node in nodes:
            counts = collections.Counter(w.power_state for w in list(node.workers.values())
                                         if not w.removed)
            for number, name in _POWER:
                family.add_metric([node.name, name], counts.get(number, 0))
        yield family


REGISTRY.register(_InstancesByPower())
