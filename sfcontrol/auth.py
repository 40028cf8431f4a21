"""Namespaces, their keys, and signed tokens.

Keys are stored only as salted scrypt hashes. A token is an HS256 JWT whose
subject is "<namespace>:<key name>" and whose "gen" claim is the generation of
that key record: it stops working when it expires, when its key is deleted or
set again, or when its namespace is deleted, even if one of the same name is
made later (checked against the cache, so no etcd read).

Tokens are signed by the newest signing key (token-keys/<kid>, the kid in the
token's header); rotate_signing_key() adds a new one without downtime: older
keys keep verifying until the tokens they signed have expired. A token's
lifetime is capped (MAX_TOKEN_TTL), also for tokens checked.
"""

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import pathlib
import re
import secrets
import time
from typing import Callable

import jwt

from sfcommon import errors
from sfcontrol import validation
from sfcommon import states
from sfcontrol.store import keys
from sfcontrol.caller import SYSTEM, Caller
from sfcontrol.core import Core
from sfcontrol.store.etcd import Txn
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import auth_service_pb2 as api, namespace_pb2 as pb, network_pb2

log = logging.getLogger(__name__)

NAME = re.compile(r'^[a-zA-Z0-9_-]{1,63}$')
ISSUER = 'shakenfist'
SYSTEM_KEY_NAME = 'deploy'
SYSTEM_KEY_FILE = 'system.key'
VERIFIED_TOKENS = 10000         # remembered verified tokens (then the memory starts again)
# Failed logins: a client (namespace, address) may fail FAILURE_BURST times, then once
# per FAILURE_REFILL seconds. scrypt runs in one worker thread at a time, off the
# event loop: wrong keys cost the attacker time, not other callers.
FAILURE_BURST, FAILURE_REFILL = 5, 2.0
SCRYPT_AT_ONCE = 1
MAX_TOKEN_TTL = 3600            # no token lives longer than this, whatever signed it
CREATED = pb.NamespaceState.Value('NAMESPACE_STATE_CREATED')


def hash_key(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def key_record(name: str, secret: str) -> records_pb2.NamespaceKeyRecord:
    salt = os.urandom(16)
    return records_pb2.NamespaceKeyRecord(name=name, hash=hash_key(secret, salt), salt=salt,
                                          created_at=time.time(), generation=secrets.token_hex(8))


def signing_key() -> records_pb2.TokenKeyRecord:
    return records_pb2.TokenKeyRecord(kid=secrets.token_hex(8), secret=secrets.token_bytes(32),
                                      created_at=time.time())


class FailureLimiter:
    """A token bucket of failures per client: FAILURE_BURST, refilled one per refill s."""

    def __init__(self, clock: Callable[[], float], burst: int = FAILURE_BURST,
                 refill: float = FAILURE_REFILL, size: int = 10000):
        self.clock, self.burst, self.refill, self.size = clock, burst, refill, size
        self._buckets: dict[tuple, tuple[float, float]] = {}     # client -> (tokens, when)

    def _tokens(self, client) -> float:
        tokens, when = self._buckets.get(client, (self.burst, self.clock()))
        return min(self.burst, tokens + (self.clock() - when) / self.refill)

    def check(self, client):
        if self._tokens(client) < 1:
            wait = self.refill * (1 - self._tokens(client))
            raise errors.TooManyRequests(f'too many failed attempts: retry in {wait:.0f} s')

    def failed(self, client):
        if len(self._buckets) >= self.size:
            self._buckets.clear()
        self._buckets[client] = (self._tokens(client) - 1, self.clock())


@dataclasses.dataclass(frozen=True)
class _Verified:
    """A token whose signature and claims were checked."""
    namespace: str
    key_name: str
    generation: str
    kid: str
    expires: float


class Auth:
    def __init__(self, core: Core, token_ttl: int = 900, clock: Callable[[], float] = time.time):
        if not 0 < token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f'token_ttl: 1 to {MAX_TOKEN_TTL} seconds')
        self.core = core
        self.token_ttl = token_ttl
        self.clock = clock
        self.failures = FailureLimiter(clock)
        self._scrypt = asyncio.Semaphore(SCRYPT_AT_ONCE)
        # Verifying the JWT was 12% of a GetInstance (bench P1); a client sends the
        # same token on every call. Expiry, revocation and the signing key are still
        # checked on every call.
        self._verified: dict[str, _Verified] = {}

    @classmethod
    async def start(cls, core: Core, state_dir: pathlib.Path | None, token_ttl: int = 900,
                    clock: Callable[[], float] = time.time):
        """Make, on first start, a signing key and the system namespace.

        On first start the system key is written to state_dir/system.key, readable
        only by its owner. Several controllers may start at once: the guards in the
        transaction let exactly one of them create the namespace (two signing keys
        would do no harm: the newer signs)."""
        auth = cls(core, token_ttl, clock)
        if not core.cache.range(keys.TOKEN_KEYS, limit=1)[0]:
            first = signing_key()
            await core.store.commit(Txn().put(keys.token_key(first.kid), first.SerializeToString())
                                    .delete(keys.LEGACY_TOKEN_SECRET))
        system_key = secrets.token_urlsafe(32)
        ns = pb.Namespace(name=SYSTEM, state=CREATED, version=1)
        txn = (Txn().create(keys.namespace(SYSTEM), ns.SerializeToString())
               .put(keys.namespace_key(SYSTEM, SYSTEM_KEY_NAME),
                    key_record(SYSTEM_KEY_NAME, system_key).SerializeToString()))
        ok, revision = await core.store.commit(txn)
        await core.cache.wait_for(revision, elsewhere=not ok)
        if ok:
            log.info('created the system namespace')
            if state_dir is not None:
                path = pathlib.Path(state_dir) / SYSTEM_KEY_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, 'w') as f:
                    f.write(system_key + '\n')
        return auth

    # -- signing keys ------------------------------------------------------------
    def _signing_keys(self) -> list[records_pb2.TokenKeyRecord]:
        """Newest first."""
        found = [e.value for e in self.core.cache.range(keys.TOKEN_KEYS)[0]]
        return sorted(found, key=lambda k: (k.created_at, k.kid), reverse=True)

    async def rotate_signing_key(self, req: api.RotateSigningKeyRequest) -> api.RotateSigningKeyResponse:
        """Sign new tokens with a new key. Tokens of older keys keep working until they
        expire (or, with revoke_earlier, not at all); keys retired longer ago than any
        token lives are removed."""
        new = signing_key()
        new.created_at = self.clock()

        def build():
            txn = Txn().put(keys.token_key(new.kid), new.SerializeToString())
            kept = older = self._signing_keys()
            if req.revoke_earlier:
                kept = []
            else:
                # A key is retired when the next newer one is made; it verifies until
                # then plus the longest token lifetime.
                kept = [older[0]] if older else []
                for newer, old in zip(older, older[1:]):
                    if newer.created_at + MAX_TOKEN_TTL >= new.created_at:
                        kept.append(old)
            for old in older:
                if old not in kept:
                    txn.delete(keys.token_key(old.kid))
            return txn, api.RotateSigningKeyResponse(kid=new.kid, earlier_keys=len(kept))
        return await self.core.mutate(build, request=req)

    # -- tokens ----------------------------------------------------------------
    async def create_token(self, req: api.CreateTokenRequest, source: str = '') -> api.CreateTokenResponse:
        """A token for a namespace's key; source (the client's address) limits failures."""
        if not req.namespace or not req.key:
            raise errors.Unauthenticated('a namespace and a key are required')
        client = (req.namespace, source)
        self.failures.check(client)
        for entry in self.core.cache.range(keys.namespace_keys(req.namespace))[0]:
            record = entry.value
            async with self._scrypt:
                digest = await asyncio.to_thread(hash_key, req.key, record.salt)
            if hmac.compare_digest(digest, record.hash):
                signer = self._signing_keys()[0]
                now = int(self.clock())
                token = jwt.encode({'sub': f'{req.namespace}:{record.name}', 'iss': ISSUER,
                                    'iat': now, 'exp': now + self.token_ttl, 'gen': record.generation,
                                    'nonce': secrets.token_hex(8)}, signer.secret, 'HS256',
                                   headers={'kid': signer.kid})
                return api.CreateTokenResponse(access_token=token, token_type='Bearer',
                                               expires_in=self.token_ttl)
        self.failures.failed(client)
        raise errors.Unauthenticated('namespace or key not recognised')

    def _verify(self, token: str) -> _Verified:
        try:
            kid = jwt.get_unverified_header(token).get('kid')
        except jwt.InvalidTokenError:
            raise errors.Unauthenticated('the token is not valid')
        signer = self.core.cache.get(keys.token_key(kid)) if isinstance(kid, str) else None
        if signer is None:
            raise errors.Unauthenticated('the token is not valid (unknown or retired signing key)')
        try:
            # Expiry is checked by authenticate(), on this controller's clock.
            claims = jwt.decode(token, signer.value.secret, algorithms=['HS256'], issuer=ISSUER,
                                options={'require': ['exp', 'iat', 'sub', 'iss', 'gen'],
                                         'verify_exp': False, 'verify_iat': False})
        except jwt.InvalidTokenError:
            raise errors.Unauthenticated('the token is not valid')
        try:
            lifetime = float(claims['exp']) - float(claims['iat'])
        except (TypeError, ValueError):
            raise errors.Unauthenticated('the token is not valid')
        if lifetime > MAX_TOKEN_TTL:
            raise errors.Unauthenticated(f'the token is not valid (lives over {MAX_TOKEN_TTL} s)')
        ns, _, key_name = str(claims['sub']).partition(':')
        return _Verified(ns, key_name, str(claims['gen']), kid, float(claims['exp']))

    def authenticate(self, authorization: str | None, request_id: str = '') -> Caller:
        """The caller a bearer token stands for; UNAUTHENTICATED otherwise."""
        if not authorization:
            raise errors.Unauthenticated('this call needs a token: send "authorization: Bearer <token>"')
        scheme, _, token = authorization.partition(' ')
        if scheme.lower() != 'bearer' or not token:
            raise errors.Unauthenticated('the authorization must be "Bearer <token>"')
        token = token.strip()
        known = self._verified.get(token)
        if known is None:
            known = self._verify(token)
            if len(self._verified) >= VERIFIED_TOKENS:
                self._verified.clear()
            self._verified[token] = known
        if known.expires <= self.clock():
            raise errors.Unauthenticated('the token has expired')
        if self.core.cache.get(keys.token_key(known.kid)) is None:
            raise errors.Unauthenticated('the token is not valid (unknown or retired signing key)')
        key = self.core.cache.get(keys.namespace_key(known.namespace, known.key_name))
        if key is None or key.value.generation != known.generation:
            raise errors.Unauthenticated('the token\'s key was deleted or set again since: log in again')
        return Caller(known.namespace, known.key_name, request_id)

    # -- namespaces (system only, enforced by the access option) ------------------
    def view(self, name: str) -> pb.Namespace:
        entry = self.core.cache.get(keys.namespace(name))
        if entry is None:
            raise errors.NotFound('namespace not found')
        out = pb.Namespace()
        out.CopyFrom(entry.value)
        out.keys.extend(e.value.name for e in self.core.cache.range(keys.namespace_keys(name))[0])
        out.trust.SetInParent()
        out.metadata.SetInParent()
        return out

    def list_namespaces(self, req: api.ListNamespacesRequest) -> api.ListNamespacesResponse:
        page, more = self.core.cache.range(keys.NAMESPACES, start_after=req.page_token or None,
                                           limit=req.page_size or 1000)
        return api.ListNamespacesResponse(namespaces=[self.view(e.value.name) for e in page],
                                          next_page_token=page[-1].key if more else '')

    async def create_namespace(self, req: api.CreateNamespaceRequest):
        if not NAME.match(req.namespace):
            raise errors.InvalidArgument('namespace: 1 to 63 characters of a-z, A-Z, 0-9, _ and -')

        def build():
            if self.core.cache.get(keys.namespace(req.namespace)) is not None:
                raise errors.AlreadyExists(f'namespace {req.namespace} already exists')
            ns = pb.Namespace(name=req.namespace, state=CREATED, version=1)
            txn = Txn().create(keys.namespace(req.namespace), ns.SerializeToString())
            return txn, api.CreateNamespaceResponse(namespace=ns)
        response = await self.core.mutate(build, request=req)
        response.namespace.CopyFrom(self.view(req.namespace))
        return response

    async def delete_namespace(self, req: api.DeleteNamespaceRequest):
        if req.namespace == SYSTEM:
            raise errors.PermissionDenied('the system namespace cannot be deleted')
        self.view(req.namespace)

        def build():
            live = self.core.cache.range(keys.instances(req.namespace),
                                         filter=lambda i: states.is_active(i.state), limit=1)[0]
            nets = self.core.cache.range(
                keys.networks(req.namespace), limit=1,
                filter=lambda n: n.state != network_pb2.NETWORK_STATE_DELETED)[0]
            if live or nets:
                raise errors.StateConflict(f'namespace {req.namespace} still has instances or networks')
            entry = self.core.cache.get(keys.namespace(req.namespace))
            if entry is None:
                raise errors.NotFound('namespace not found')
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
            raise errors.InvalidArgument('key_name: 1 to 63 characters of a-z, A-Z, 0-9, _ and -')
        if not req.key:
            raise errors.InvalidArgument('key: the key cannot be empty')
        record = key_record(req.key_name, req.key)
        response = (api.AddNamespaceKeyResponse if create else api.UpdateNamespaceKeyResponse)(
            key_name=req.key_name)

        def build():
            key = keys.namespace_key(req.namespace, req.key_name)
            exists = self.core.cache.get(key)
            if create and exists:
                raise errors.AlreadyExists(f'key {req.key_name} already exists')
            if not create and not exists:
                raise errors.NotFound(f'key {req.key_name} not found')
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
                raise errors.NotFound(f'key {req.key_name} not found')
            return Txn().delete(entry.key), api.DeleteNamespaceKeyResponse()
        return await self.core.mutate(build, request=req)

