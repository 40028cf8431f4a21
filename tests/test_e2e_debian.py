"""End to end, a real distribution: the debian-sftest image (guest/debian, Debian 12
with cloud-init and shakenfist-agent 0.7.0) on a DHCP and NAT network, under
QEMU/TCG. cloud-init is the judge of our config drive: it applies the hostname,
the ssh key (root logs in with it, from the network's own namespace on the
network node), both kinds of user data (a #cloud-config and a script, in one
MIME multipart) and the network of network_data.json (address, default route,
DNS and MTU). The instance has only the legacy `sf-agent` side channel, as the
seed's soft-reboot example creates it: the real shakenfist-agent 0.7.0 speaks
protocol v1 to the node (sfnode/agent/v1.py), the agent becomes ready, sf-client
executes, uploads and downloads byte-exact through it, and a soft reboot changes
agent_system_boot_time. A slow test: the guest takes about a minute to finish
cloud-init on an idle 2-core machine."""

import base64
import os
import re
import subprocess
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
import pytest_asyncio

from sfup.nodes import DEBIAN_IMAGE
from sfup.underlay import plane_prefix
from shakenfist.v1 import instance_pb2 as pb
from shakenfist.v1 import instance_service_pb2 as api
from shakenfist.v1 import network_service_pb2 as net
from shakenfist.v1 import specs_pb2
from tests.helpers import get
from tests.plane import Plane
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
NETBLOCK = '198.18.40.0/24'
BOOT = 600.0        # cloud-init's end: ~60 s idle, several minutes on a loaded 2-core machine
FINISHED = re.compile(r'Cloud-init v\. \S+ finished')

CLOUD_CONFIG = '''#cloud-config
write_files:
  - path: /etc/sftest-cloud-config
    content: written by cloud-config
'''
SCRIPT = '#!/bin/sh\necho "ran as $(id -un)" > /etc/sftest-script\n'


def user_data() -> str:
    mime = MIMEMultipart()
    mime.attach(MIMEText(CLOUD_CONFIG, 'cloud-config'))
    mime.attach(MIMEText(SCRIPT, 'x-shellscript'))
    return base64.b64encode(mime.as_bytes()).decode()


@pytest.fixture(scope='module')
def plane():
    assert DEBIAN_IMAGE.exists(), 'make debian-image (make test does) builds the image'
    p = Plane(nodes=1).start()
    yield p
    p.stop()


@pytest.fixture(scope='module')
def key(tmp_path_factory):
    path = tmp_path_factory.mktemp('ssh') / 'id'
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(path)], check=True)
    return path


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def client(plane):
    c = await plane.client()
    yield c
    await c.close()


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def guest(plane, client, key):
    network = (await client.networks.CreateNetwork(net.CreateNetworkRequest(
        name='deb', netblock=NETBLOCK, provide_dhcp=True, provide_nat=True))).network
    inst = (await client.instances.CreateInstance(api.CreateInstanceRequest(
        name='bookworm', cpus=1, memory=1024, disk=[specs_pb2.DiskSpec(size=4, base='debian-sftest')],
        network=[specs_pb2.NetworkSpec(network_uuid='deb')],
        ssh_key=(key.parent / 'id.pub').read_text().strip(), user_data=user_data(),
        side_channels=pb.SideChannelList(side_channels=[pb.SIDE_CHANNEL_SF_AGENT])))).instance
    await eventually(lambda: FINISHED.search(plane.console(inst.node, inst.uuid)), BOOT, interval=1,
                     what='cloud-init finished in the guest')
    inst = await get(client, inst.uuid)
    assert inst.state == pb.INSTANCE_STATE_CREATED
    return network, inst


def ssh(plane, network, inst, key, command: str) -> str:
    """command as root in the guest, over ssh from the network's namespace."""
    netns = f'{plane_prefix(plane.state)}0-dhcp-{network.vxlan_id:06x}'
    r = subprocess.run(['ip', 'netns', 'exec', netns, 'ssh', '-i', str(key), '-o', 'BatchMode=yes',
                        '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
                        '-o', 'ConnectTimeout=10', f'root@{inst.interfaces[0].ipv4}', command],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


async def test_cloud_init_read_our_config_drive_and_said_so(plane, guest):
    _, inst = guest
    console = plane.console(inst.node, inst.uuid)
    assert 'DataSourceConfigDrive' in console or 'config-2' in console, console[-3000:]


async def test_root_logs_in_with_the_instances_key_and_the_hostname_is_its_name(plane, guest, key):
    network, inst = guest
    assert ssh(plane, network, inst, key, 'hostname').strip() == 'bookworm'
    assert ssh(plane, network, inst, key, 'id -un').strip() == 'root'


async def test_both_kinds_of_user_data_ran(plane, guest, key):
    network, inst = guest
    assert ssh(plane, network, inst, key, 'cat /etc/sftest-cloud-config').strip() == 'written by cloud-config'
    assert ssh(plane, network, inst, key, 'cat /etc/sftest-script').strip() == 'ran as root'


async def test_the_network_of_network_data_json_is_applied(plane, guest, key):
    network, inst = guest
    address, gateway = inst.interfaces[0].ipv4, NETBLOCK.replace('0/24', '1')
    addrs = ssh(plane, network, inst, key, 'ip -4 -o addr show dev eth0')
    assert f'inet {address}/24' in addrs, addrs
    assert ssh(plane, network, inst, key, 'cat /sys/class/net/eth0/mtu').strip() == '1450'
    routes = ssh(plane, network, inst, key, 'ip -4 route show default')
    assert f'default via {gateway}' in routes, routes
    resolv = ssh(plane, network, inst, key, 'cat /etc/resolv.conf')
    assert f'nameserver {gateway}' in resolv, resolv


async def until(client, what, check, timeout=BOOT):
    async def probe():
        return check(await get(client, 'bookworm'))
    return await eventually(probe, timeout, interval=0.5, what=f'bookworm: {what}')


async def messages(client, ref) -> list[str]:
    """Every event of the instance, newest first (a slow boot makes pages of usage events)."""
    out, token = [], ''
    while True:
        page = await client.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
            instance_ref=ref, page_token=token))
        out += [e.message for e in page.events]
        if not (token := page.next_page_token):
            return out


async def test_the_real_agent_becomes_ready_over_protocol_v1(client, guest):
    inst = await until(client, 'agent ready', lambda i: i if i.agent_state == pb.AGENT_STATE_READY else None)
    assert inst.agent_system_boot_time > 0
    events = await messages(client, 'bookworm')
    assert 'agent metrics' in events and 'received system facts' in events, events


async def test_sf_client_executes_uploads_and_downloads_through_the_v1_agent(plane, client, guest, tmp_path):
    await until(client, 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    sf = plane.sf()
    _, out, _ = await sf.run('instance', 'execute', 'bookworm', 'sh -c "echo hello; echo oops >&2; exit 3"')
    assert 'exit code     : 3' in out and 'hello' in out and 'oops' in out, out
    src, back = tmp_path / 'random.bin', tmp_path / 'back.bin'
    src.write_bytes(os.urandom(300 * 1024))
    await sf.run('instance', 'upload', 'bookworm', str(src), '/tmp/random.bin')
    await sf.run('instance', 'download', 'bookworm', '/tmp/random.bin', str(back))
    assert back.read_bytes() == src.read_bytes()


async def test_a_soft_reboot_changes_the_agents_boot_time(client, guest):
    before = (await until(client, 'agent ready', lambda i: i if i.agent_state == pb.AGENT_STATE_READY else None)
              ).agent_system_boot_time
    await client.instances.SoftRebootInstance(api.SoftRebootInstanceRequest(instance_ref='bookworm'))
    await until(client, 'a new boot time', lambda i: i.agent_state == pb.AGENT_STATE_READY
                and abs(i.agent_system_boot_time - before) > 2)
    assert 'reboot detected' in await messages(client, 'bookworm')


async def test_the_image_boots_under_uefi_with_secure_boot_to_its_agent(plane, client, guest):
    # Debian's signed shim, GRUB and kernel, from the image's EFI system partition.
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='bookworm'))
    inst = (await client.instances.CreateInstance(api.CreateInstanceRequest(
        name='bookworm-uefi', cpus=1, memory=1024, uefi=True, secure_boot=True,
        disk=[specs_pb2.DiskSpec(size=4, base='debian-sftest')],
        side_channels=pb.SideChannelList(side_channels=[pb.SIDE_CHANNEL_SF_AGENT])))).instance

    async def ready():
        i = await get(client, inst.uuid)
        assert i.state != pb.INSTANCE_STATE_ERROR, i.error_message
        return i.agent_state == pb.AGENT_STATE_READY
    await eventually(ready, BOOT, interval=1, what='bookworm-uefi: agent ready')
    assert FINISHED.search(plane.console(inst.node, inst.uuid))
    sf = plane.sf()
    _, out, _ = await sf.run('instance', 'execute', 'bookworm-uefi', 'dmesg | grep -E "secureboot|efi: EFI"')
    assert 'secureboot: Secure boot enabled' in out and 'efi: EFI v2' in out, out[-3000:]
