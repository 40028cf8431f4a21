"""Metadata of networks and interfaces: any JSON value per key.

(Instances validate `tags` and `affinity` and keep their own, in instances.py,
on the same pattern.)"""

from google.protobuf import json_format

from sfcommon import errors
from sfcontrol import limits
from sfcontrol.core import Core
from sfcontrol.store.etcd import Txn


class Metadata:
    def __init__(self, core: Core):
        self.core = core

    async def set(self, key: str, request, response):
        if not request.key:
            raise errors.InvalidArgument('key: a metadata key is required')
        if not request.HasField('value'):
            raise errors.InvalidArgument('no value specified')
        value = json_format.MessageToDict(request.value)
        return await self._change(key, request, response,
                                  lambda md: md.update({request.key: value}))

    async def delete(self, key: str, request, response):
        def change(md):
            if request.key not in md:
                raise errors.NotFound(f'metadata key {request.key} not found')
            del md[request.key]
        return await self._change(key, request, response, change)

    async def _change(self, key, request, response, change):
        def build():
            entry = self.core.cache.get(key)
            if entry is None:
                raise errors.NotFound('object not found')
            obj = type(entry.value)()
            obj.CopyFrom(entry.value)
            change(obj.metadata)
            limits.check_stored(obj, 'metadata')      # the object's limits on all its keys
            txn = Txn().check_revision(key, entry.mod_revision).put(key, obj.SerializeToString())
            return txn, response
        return await self.core.mutate(build, request=request)
