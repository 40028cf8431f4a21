"""Namespaces, their keys, and signed tokens.

Keys are stored only as salted scrypt hashes. A token is an HS256 JWT whose
subject is "<namespace>:<key name>"; it stops working when it expires or when
its key or namespace is deleted (checked against the cache, so no etcd read).
"""

import hashlib
import hmac
import logging
import os
import pathlib
import re
import secrets
import time

import jwt

from sfcommon import errors
from sfcontrol import keys, states, validation
from sfcontrol.caller import SYSTEM, Caller
from sfcontrol.core import Core
from sfcontrol.store import Txn
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import auth_service_pb2 as api, namespace_pb2 as pb, network_pb2

log = logging.getLogger(__name__)

NAME = re.compile(r'^[a-zA-Z0-9_-]{1,63}$')
ISSUER = 'shakenfist'
SYSTEM_KEY_NAME = 'deploy'
SYSTEM_KEY_FILE = 'system.key'
VERIFIED_TOKENS = 10000         # remembered verified tokens (then the memory starts again)
CREATED = pb.NamespaceState.Value('NAMESPACE_STATE_CREATED')


def hash_key(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def key_record(name: str, secret: str) -> records_pb2.NamespaceKeyRecord:
    salt = os.urandom(16)
    return records_pb2.NamespaceKeyRecord(name=name, hash=hash_key(secret, salt), salt=salt,
                                          created_at=time.time())


class Auth:
    def __init__(self, core: Core, secret: bytes, token_ttl: int = 900):
        self.core = core
        self._secret = secret
        self.token_ttl = token_ttl
        # Tokens whose signature was checked: token -> (namespace, key name, expiry).
        # Verifying the JWT was 12% of a GetInstance (bench P1); a client sends the
        # same token on every call. Expiry and key revocation are still checked.
        self._verified: dict[str, tuple[str, str, float]] = {}

    @classmethod
    async def start(cls, core: Core, state_dir: pathlib.Path | None, token_ttl: int = 900):
        """Load (or make, on first start) the token secret and the system namespace.

        On first start the system key is written to state_dir/system.key, readable
        only by its owner. Several controllers may start at once: the guards in the
        transaction let exactly one of them create these."""
        system_key = secrets.token_urlsafe(32)
        txn = Txn().create(keys.TOKEN_SECRET, secrets.token_bytes(32))
        ok, revision = await core.store.commit(txn)
        secret = (await core.store.get(keys.TOKEN_SECRET))[0]
        ns = pb.Namespace(name=SYSTEM, state=CREATED, version=1)
        txn = (Txn().create(keys.namespace(SYSTEM), ns.SerializeToString())
               .put(keys.namespace_key(SYSTEM, SYSTEM_KEY_NAME),
                    key_record(SYSTEM_KEY_NAME, system_key).SerializeToString()))
        ok, revision = await core.store.commit(txn)
        await core.cache.wait_for(revision)
        if ok:
            log.info('created the system namespace')
            if state_dir is not None:
                path = pathlib.Path(state_dir) / SYSTEM_KEY_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, 'w') as f:
                    f.write(system_key + '\n')
        return cls(core, secret, token_ttl)

    # -- tokens ----------------------------------------------------------------
    def create_token(self, req: api.CreateTokenRequest) -> api.CreateTokenResponse:
        if not req.namespace or not req.key:
            raise errors.unauthenticated('a namespace and a key are required')
        for entry in self.core.cache.range(keys.namespace_keys(req.namespace))[0]:
            record = entry.value
            if hmac.compare_digest(hash_key(req.key, record.salt), record.hash):
                now = int(time.time())
                token = jwt.encode({'sub': f'{req.namespace}:{record.name}', 'iss': ISSUER,
                                    'iat': now, 'exp': now + self.token_ttl,
                                    'nonce': secrets.token_hex(8)}, self._secret, 'HS256')
                return api.CreateTokenResponse(access_token=token, token_type='Bearer',
                                               expires_in=self.token_ttl)
        raise errors.unauthenticated('namespace or key not recognised')

    def authenticate(self, authorization: str | None, request_id: str = '') -> Caller:
        """The caller a bearer token stands for; UNAUTHENTICATED otherwise."""
        if not authorization:
            raise errors.unauthenticated('this call needs a token: send "authorization: Bearer <token>"')
        scheme, _, token = authorization.partition(' ')
        if scheme.lower() != 'bearer' or not token:
            raise errors.unauthenticated('the authorization must be "Bearer <token>"')
        token = token.strip()
        known = self._verified.get(token)
        if known is not None and known[2] <= time.time():
            raise errors.unauthenticated('the token has expired')
        if known is None:
            try:
                claims = jwt.decode(token, self._secret, algorithms=['HS256'], issuer=ISSUER,
                                    options={'require': ['exp', 'sub', 'iss']})
            except jwt.ExpiredSignatureError:
                raise errors.unauthenticated('the token has expired')
            except jwt.InvalidTokenError:
                raise errors.unauthenticated('the token is not valid')
            ns, _, key_name = str(claims['sub']).partition(':')
            if len(self._verified) >= VERIFIED_TOKENS:
                self._verified.clear()
            known = self._verified[token] = (ns, key_name, float(claims['exp']))
        ns, key_name, _ = known
        if self.core.cache.get(keys.namespace_key(ns, key_name)) is None:
            raise errors.unauthenticated('the token\'s key no longer exists')
        return Caller(ns, key_name, request_id)

    # -- namespaces (system only, enforced by the access option) ------------------
    def view(self, name: str) -> pb.Namespace:
        entry = self.core.cache.get(keys.namespace(name))
        if entry is None:
            raise errors.not_found('namespace not found')
        out = pb.Namespace()
        out.CopyFrom(entry.value)
        out.keys.extend(e.value.name for e in self.core.cache.range(keys.namespace_keys(name))[0])
        out.trust.SetInParent()
        out.metadata.SetInParent()
        return out

    def list_namespaces(self, req: api.ListNamespacesRequest) -> api.ListNamespacesResponse:
        page, more = self.core.cache.range('namespaces/', start_after=req.page_token or None,
                                           limit=req.page_size or 1000)
        return api.ListNamespacesResponse(namespaces=[self.view(e.value.name) for e in page],
                                          next_page_token=page[-1].key if more else '')

    async def create_namespace(self, req: api.CreateNamespaceRequest):
        if not NAME.match(req.namespace):
            raise errors.invalid('namespace: 1 to 63 characters of a-z, A-Z, 0-9, _ and -')

        def build():
            if self.core.cache.get(keys.namespace(req.namespace)) is not None:
                raise errors.already_exists(f'namespace {req.namespace} already exists')
            ns = pb.Namespace(name=req.namespace, state=CREATED, version=1)
            txn = Txn().create(keys.namespace(req.namespace), ns.SerializeToString())
            return txn, api.CreateNamespaceResponse(namespace=ns)
        response = await self.core.mutate(build, request=req)
        response.namespace.CopyFrom(self.view(req.namespace))
        return response

    async def delete_namespace(self, req: api.DeleteNamespaceRequest):
        if req.namespace == SYSTEM:
            raise errors.permission_denied('the system namespace cannot be deleted')
        self.view(req.namespace)

        def build():
            live = self.core.cache.range(f'instances/{req.namespace}/',
                                         filter=lambda i: states.is_active(i.state), limit=1)[0]
            nets = self.core.cache.range(
                f'networks/{req.namespace}/', limit=1,
                filter=lambda n: n.state != network_pb2.NETWORK_STATE_DELETED)[0]
            if live or nets:
                raise errors.conflict(f'namespace {req.namespace} still has instances or networks')
            entry = self.core.cache.get(keys.namespace(req.namespace))
            if entry is None:
                raise errors.not_found('namespace not found')
            txn = Txn().check_revision(entry.key, entry.mod_revision).delete(entry.key)
            for key_entry in self.core.cache.range(keys.namespace_keys(req.namespace))[0]:
                txn.delete(key_entry.key)
            return txn, api.DeleteNamespaceResponse()
        return await self.core.mutate(build, request=req)

    def list_keys(self, req: api.ListNamespaceKeysRequest) -> api.ListNamespaceKeysResponse:
        names = list(self.view(req.namespace).keys)
        start = validation.page_start(req.page_token)
        end = start + req.page_size if req.page_size else len(names)
        return api.ListNamespaceKeysResponse(key_names=names[start:end],
                                             next_page_token=str(end) if end < len(names) else '')

    async def set_key(self, req, *, create: bool):
        self.view(req.namespace)
        if not NAME.match(req.key_name):
            raise errors.invalid('key_name: 1 to 63 characters of a-z, A-Z, 0-9, _ and -')
        if not req.key:
            raise errors.invalid('key: the key cannot be empty')
        record = key_record(req.key_name, req.key)
        response = (api.AddNamespaceKeyResponse if create else api.UpdateNamespaceKeyResponse)(
            key_name=req.key_name)

        def build():
            key = keys.namespace_key(req.namespace, req.key_name)
            exists = self.core.cache.get(key)
            if create and exists:
                raise errors.already_exists(f'key {req.key_name} already exists')
            if not create and not exists:
                raise errors.not_found(f'key {req.key_name} not found')
            txn = Txn().check_revision(keys.namespace(req.namespace),
                                       self.core.cache.get(keys.namespace(req.namespace)).mod_revision)
            txn.put(key, record.SerializeToString())
            return txn, response
        return await self.core.mutate(build, request=req)

    async def delete_key(self, req: api.DeleteNamespaceKeyRequest):
        self.view(req.namespace)

        def build():
            entry = self.core.cache.get(keys.namespace_key(req.namespace, req.key_name))
            if entry is None:
                raise errors.not_found(f'key {req.key_name} not found')
            return Txn().delete(entry.key), api.DeleteNamespaceKeyResponse()
        return await self.core.mutate(build, request=req)

