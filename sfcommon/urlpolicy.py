"""Which image URLs a tenant may ask a node to fetch.

A disk's base is fetched by the node as root and shown to the tenant's guest,
so a URL is a way to read whatever the node can reach. A tenant's URL is http
or https to a public address; only the operator's shorthand table (debian:12,
sftest, ...) and allow-list may name local files or internal addresses.

The controller refuses what it can see is wrong (schemes, literal addresses,
localhost); the node, where the fetch happens, also checks every address a name
resolves to and every redirect (images.fetch), so DNS cannot smuggle an
internal address past the controller.
"""

import ipaddress
import posixpath
import socket
import urllib.parse

from sfcommon import errors

TENANT_SCHEMES = ('http', 'https')
MAX_REDIRECTS = 5


def is_internal(address: str) -> bool:
    """Loopback, private, link-local, shared, multicast, reserved: anything not global."""
    ip = ipaddress.ip_address(address.split('%', 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _literal(host: str) -> str | None:
    """The address a host that is an address stands for, also in the legacy IPv4 forms
    that resolvers accept (127.1, 0x7f000001, 2130706433)."""
    try:
        return str(ipaddress.ip_address(host.strip('[]').split('%', 1)[0]))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


class Rule:
    """One allow-list entry: a URL whose scheme, host and port must match exactly and
    whose path must be a prefix (by path segments) of the URL's."""

    def __init__(self, entry: str):
        parsed = urllib.parse.urlsplit(entry)
        if not parsed.scheme:
            raise ValueError(f'image allow-list entry {entry!r}: not a URL')
        self.entry = entry
        self.scheme = parsed.scheme.lower()
        self.netloc = parsed.netloc.lower()
        self.path = posixpath.normpath(parsed.path or '/')

    def allows(self, url: urllib.parse.SplitResult) -> bool:
        if url.scheme.lower() != self.scheme or url.netloc.lower() != self.netloc:
            return False
        path = posixpath.normpath(urllib.parse.unquote(url.path) or '/')
        return self.path == '/' or path == self.path or path.startswith(self.path.rstrip('/') + '/')


class ImagePolicy:
    def __init__(self, allow: list[str] | tuple[str, ...] = ()):
        self.rules = [Rule(e) for e in allow]

    def allowed_by_operator(self, url: str) -> bool:
        parsed = urllib.parse.urlsplit(url)
        return any(rule.allows(parsed) for rule in self.rules)

    def check(self, url: str) -> urllib.parse.SplitResult:
        """The parsed URL if a tenant may have it fetched; INVALID_ARGUMENT otherwise. A
        hostname is not resolved here: see check_address()."""
        try:
            parsed = urllib.parse.urlsplit(url)
            parsed.port     # raises on a bad port
        except ValueError:
            raise errors.InvalidArgument(f'image {url!r} is not a valid URL')
        if self.allowed_by_operator(url):
            return parsed
        if parsed.scheme.lower() not in TENANT_SCHEMES:
            raise errors.InvalidArgument(f'image {url!r}: only http and https URLs (or the shorthands '
                                 'of this cloud) may be used')
        host = (parsed.hostname or '').rstrip('.').lower()
        if not host:
            raise errors.InvalidArgument(f'image {url!r} names no host')
        if parsed.username is not None or parsed.password is not None:
            raise errors.InvalidArgument(f'image {url!r}: credentials in a URL are not allowed')
        if host == 'localhost' or host.endswith('.localhost'):
            raise errors.InvalidArgument(f'image {url!r}: internal addresses may not be used')
        literal = _literal(host)
        if literal is not None:
            self.check_address(url, literal)
        return parsed

    def check_address(self, url: str, address: str):
        """Refuse an internal address that url's host resolved to (unless allow-listed)."""
        if is_internal(address) and not self.allowed_by_operator(url):
            raise errors.InvalidArgument(f'image {url!r}: internal addresses may not be used')
