"""Where a server may listen in plaintext: loopback only (everything else needs TLS)."""

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether a listen host (an address, 'localhost', or host:port) is loopback only."""
    if host.count(':') == 1 or (host.startswith('[') and ']:' in host):
        host = host.rsplit(':', 1)[0]
    host = host.strip('[]')
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_plaintext(where: str, listen: str):
    if not is_loopback(listen):
        raise ValueError(f'{where} would listen on {listen} in plaintext: give --tls-cert and '
                         '--tls-key, or listen on a loopback address')
