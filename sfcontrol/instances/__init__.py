"""Instances: the logic behind InstanceService, by concern."""

from .consoles import Consoles
from .lifecycle import Instances
from .power import Power
from .snapshots import Snapshots

__all__ = ['Consoles', 'Instances', 'Power', 'Snapshots']
