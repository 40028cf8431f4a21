"""iproute2 and friends as argument-list subprocesses (the reference found them
simpler and sturdier than pyroute2, whose API differs between versions)."""

import asyncio
import json
import sys

from sfcommon import errors

# A VXLAN header costs 50 bytes of the underlay's 1500.
VXLAN_OVERHEAD = 50
UNDERLAY_MTU = 1500
NETWORK_MTU = UNDERLAY_MTU - VXLAN_OVERHEAD


async def run(*argv: str, check: bool = True, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL if stdin is None
                                                else asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    if check and proc.returncode != 0:
        raise errors.Internal(f'{" ".join(argv)} failed: {err.decode().strip()[-300:]}')
    return out.decode()


async def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    return await run('ip', *(('-n', netns) if netns else ()), *args, check=check)


async def links(prefix: str, netns: str | None = None) -> dict[str, dict]:
    """The links whose names start with prefix, by name (ip -d -j link)."""
    out = await ip('-d', '-j', 'link', 'show', netns=netns)
    return {link['ifname']: link for link in json.loads(out or '[]')
            if link['ifname'].startswith(prefix)}


async def namespaces(prefix: str) -> set[str]:
    out = await run('ip', '-j', 'netns', 'list')
    return {ns['name'] for ns in json.loads(out or '[]') if ns['name'].startswith(prefix)}


# One gratuitous ARP (a broadcast request for the address, from it), from inside
# a namespace. arping waits a whole second after sending; this takes ~30 ms.
_GRATUITOUS_ARP = """
import socket, struct, sys
device, address = sys.argv[1], socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((device, 0))
mac = s.getsockname()[4]
s.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
       + mac + address + bytes(6) + address)
"""


async def announce(address: str, device: str, netns: str):
    """Tell the link that address is now at device: a neighbour that asked for it
    before it was there (its entry incomplete) learns it now, not at its next ARP
    retry a second later."""
    await run('ip', 'netns', 'exec', netns, sys.executable, '-I', '-S', '-c', _GRATUITOUS_ARP, device, address,
              check=False)
