"""Create-time validation of instances (wire reference §C.2), and metadata rules."""

import re
import urllib.parse

from google.protobuf import json_format, struct_pb2

from sfcommon import errors
from sfcommon.urlpolicy import ImagePolicy
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api, specs_pb2

HOSTNAME = re.compile(r'^[a-zA-Z0-9-]{1,63}$')
DEFAULT_SIDE_CHANNELS = [instance_pb2.SIDE_CHANNEL_SF_AGENT, instance_pb2.SIDE_CHANNEL_SF_AGENT2]
DEFAULT_VIDEO = dict(model=specs_pb2.VIDEO_MODEL_CIRRUS, memory=16384, vdi=specs_pb2.VDI_TYPE_SPICE)
BLANK_BASES = ('', 'none')


def check_create(req: api.CreateInstanceRequest, images: ImagePolicy):
    """Raise INVALID_ARGUMENT for the first problem found, in Shaken Fist's order."""
    if not HOSTNAME.match(req.name):
        raise errors.InvalidArgument('name: an instance name must be a hostname: 1 to 63 characters '
                             'of a-z, A-Z, 0-9 and -')
    if req.cpus < 1:
        raise errors.InvalidArgument('cpus: an instance needs at least one cpu')
    if req.memory < 1:
        raise errors.InvalidArgument('memory: an instance needs memory (in MiB)')
    if req.secure_boot and not req.uefi:
        raise errors.InvalidArgument('secure boot requires UEFI: set uefi as well')
    if req.vtpm and not req.uefi:
        raise errors.InvalidArgument('vtpm: a TPM is for UEFI guests: set uefi as well')
    if req.nvram_template and not req.uefi:
        raise errors.InvalidArgument('nvram_template: an NVRAM template is for UEFI guests: set uefi as well')
    if req.nvram_template.startswith('label:'):
        raise errors.NotFound(f'nvram_template: {req.nvram_template} not found (this plane has no labels)')
    if not req.disk:
        raise errors.InvalidArgument('disk: an instance must specify at least one disk')
    for i, disk in enumerate(req.disk):
        if disk.bus == specs_pb2.DISK_BUS_IDE:
            raise errors.InvalidArgument(f'disk[{i}].bus: the ide bus is not supported (removed in '
                                 'Shaken Fist v0.7 for its poor performance); use sata')
        if disk.HasField('size') and disk.size < 0:
            raise errors.InvalidArgument(f'disk[{i}].size: a disk size cannot be negative')
        base = disk.base if disk.HasField('base') else ''
        if disk.type == specs_pb2.DISK_TYPE_CDROM and base.lower() in BLANK_BASES:
            raise errors.InvalidArgument(f'disk[{i}]: a cdrom needs a base image')
        if base.startswith('label:'):
            raise errors.NotFound(f'disk[{i}].base: {base} not found (this plane has no labels)')
        if base.startswith('sf://'):
            continue        # a blob, resolved at create (Instances.base_blob)
        if urllib.parse.urlsplit(base).scheme:      # else a shorthand, the node's to know
            try:
                images.check(base)
            except errors.ApiError as e:
                raise errors.InvalidArgument(f'disk[{i}].base: {e.message}')
    for i, net in enumerate(req.network):
        if not net.network_uuid:
            raise errors.InvalidArgument(f'network[{i}]: a networkspec must name a network_uuid')
    if req.HasField('video') and (not req.video.model or not req.video.HasField('memory')):
        raise errors.InvalidArgument('video: a video specification must include model and memory')
    if req.HasField('video') and req.video.memory <= 0:
        raise errors.InvalidArgument('video.memory: video memory must be positive (KiB)')
    if req.HasField('metadata'):
        for key, value in json_format.MessageToDict(req.metadata).items():
            check_metadata(key, value)
    if req.HasField('side_channels'):
        for channel in req.side_channels.side_channels:
            if channel == instance_pb2.SIDE_CHANNEL_UNSPECIFIED:
                raise errors.InvalidArgument('side_channels: unspecified is not a known side channel type')


def check_metadata(key: str, value):
    """tags must be a list of strings; affinity an object of numeric weights by tag."""
    if not key:
        raise errors.InvalidArgument('metadata: keys cannot be empty')
    if isinstance(value, struct_pb2.Value):
        value = json_format.MessageToDict(value)
    if key == 'tags':
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise errors.InvalidArgument('metadata tags must be a JSON list of strings')
    elif key == 'affinity':
        if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise errors.InvalidArgument('metadata affinity must be a JSON object of {tag: weight}, '
                                 'for example {"webserver": -10}')


def page_start(token: str) -> int:
    """The index a page token of an index-paged list stands for; 0 for none, or for
    a token that is not one (str.isdigit() alone also takes '²', which int()
    refuses, and a 5000-digit string is more than int() will read)."""
    return int(token) if token.isascii() and token.isdigit() and len(token) <= 18 else 0
