"""The sftest guest image (guest/): build it, check the disk, and boot it for real.

The image boots as a BIOS disk under QEMU/TCG (no -kernel/-initrd), from a
virtio disk and from a SATA (ahci) disk; the tests wait, with deadlines, for the
"SFTEST ..." markers that guest/initramfs/init prints on the serial console.

The image is built into build/guest/, where `make` and the sfnode tests build
it too (guest/build-image.sh skips every step whose output is fresh and takes a
lock, so a warm build costs milliseconds and concurrent sessions are safe). Set
SF_GUEST_IMAGE_DIR to use another directory: a build already there
(sftest.qcow2) is used as it is, without a rebuild; otherwise one is made there.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / 'guest' / 'build-image.sh'
QEMU = shutil.which('qemu-system-x86_64')
QEMU_IMG = shutil.which('qemu-img')
DISK_MB = 64
BOOT_TIMEOUT = 60.0  # boot to "init: ready" takes 4-7 s under TCG on 2 cores

pytestmark = pytest.mark.skipif(not (QEMU and QEMU_IMG),
                                reason='needs qemu-system-x86 and qemu-utils')


class Timeout(AssertionError):
    pass


def wait_until(check, timeout, what, interval=0.1):
    """Return check()'s first truthy value; fail once the deadline has passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Timeout(f'{what}: not within {timeout} s')
        time.sleep(interval)


# --- the image -------------------------------------------------------------------

@pytest.fixture(scope='session')
def guest_image():
    """The directory of a guest image build: sftest.qcow2, vmlinuz, initrd.img."""
    env_dir = os.environ.get('SF_GUEST_IMAGE_DIR')
    if env_dir and (Path(env_dir) / 'sftest.qcow2').exists():
        return Path(env_dir)
    out = Path(env_dir) if env_dir else REPO / 'build' / 'guest'
    started = time.monotonic()
    r = subprocess.run(['bash', str(BUILD_SCRIPT), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, f'guest image build failed:\n{r.stdout}\n{r.stderr}'
    print(f'\nguest image build: {time.monotonic() - started:.2f} s ({out})')
    return out


def test_image_is_a_qcow2_of_the_expected_size(guest_image):
    info = json.loads(subprocess.run(
        [QEMU_IMG, 'info', '--output=json', str(guest_image / 'sftest.qcow2')],
        check=True, capture_output=True, text=True).stdout)
    assert info['format'] == 'qcow2'
    assert info['virtual-size'] == DISK_MB * 1024 * 1024
    assert info['actual-size'] < 32 * 1024 * 1024  # sparse: kernel + initramfs, ~14 MiB


def test_image_is_an_mbr_disk_with_one_bootable_partition(guest_image, tmp_path):
    raw = tmp_path / 'disk.raw'
    subprocess.run([QEMU_IMG, 'convert', '-O', 'raw', str(guest_image / 'sftest.qcow2'), str(raw)],
                   check=True)
    mbr = raw.read_bytes()[:512]
    assert mbr[510:512] == b'\x55\xaa'
    entry = mbr[446:462]
    assert entry[0] == 0x80, 'partition 1 is not marked active'
    assert entry[4] == 0x0e, 'partition 1 is not FAT16 (LBA)'
    start = int.from_bytes(entry[8:12], 'little')
    sectors = int.from_bytes(entry[12:16], 'little')
    assert start == 2048 and start + sectors <= DISK_MB * 2048
    assert mbr[462:510] == bytes(48), 'only one partition expected'

    # The partition's files, read with mtools (which the build needs too) at its offset.
    env = dict(os.environ, MTOOLS_SKIP_CHECK='1')
    part = f'{raw}@@{start * 512}'
    listing = subprocess.run(['mdir', '-a', '-b', '-i', part, '::/'],
                             check=True, capture_output=True, text=True, env=env).stdout
    for name in ('ldlinux.sys', 'ldlinux.c32', 'syslinux.cfg', 'vmlinuz', 'initrd.img'):
        assert f'::/{name}' in listing
    cfg = subprocess.run(['mtype', '-i', part, '::/syslinux.cfg'],
                         check=True, capture_output=True, text=True, env=env).stdout
    assert 'APPEND console=tty0 console=ttyS0' in cfg


# --- booting it --------------------------------------------------------------------

class Guest:
    """One qemu-system-x86_64 process under TCG, its serial log, QMP and agent sockets."""

    def __init__(self, workdir: Path, name: str, args: list[str], agent=False, reboot=False):
        self.dir = workdir / name
        self.dir.mkdir()
        self.serial = self.dir / 'serial.log'
        # unix socket paths must stay under 108 bytes: not in a deep tmp_path
        self.sockets = Path(tempfile.mkdtemp(prefix='sftest-'))
        self.qmp_path = self.sockets / 'qmp.sock'
        self.agent_path = self.sockets / 'agent.sock'
        cmd = [QEMU, '-machine', 'pc,accel=tcg', '-m', '256', '-smp', '1',
               '-nodefaults', '-vga', 'std', '-display', 'none', '-monitor', 'none',
               '-serial', f'file:{self.serial}',
               '-qmp', f'unix:{self.qmp_path},server=on,wait=off', *args]
        if not reboot:
            cmd.append('-no-reboot')  # a reset (from the guest or QMP) ends qemu
        if agent:
            # the virtio-serial port the agent answers on
            cmd += ['-device', 'virtio-serial-pci',
                    '-chardev', f'socket,id=agent,path={self.agent_path},server=on,wait=off',
                    '-device', 'virtserialport,chardev=agent,name=sf-agent2']
        self.stderr = open(self.dir / 'qemu.stderr', 'w')
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=subprocess.STDOUT)
        self._qmp = None

    def log(self) -> str:
        try:
            return self.serial.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    def wait_for(self, marker: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the serial log has marker; return seconds since qemu started."""
        def seen():
            if marker in self.log():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise AssertionError(f'qemu exited ({self.proc.returncode}) before {marker!r}; '
                                     f'serial log ends:\n{self.log()[-3000:]}\n'
                                     f'qemu: {(self.dir / "qemu.stderr").read_text()}')
            return None
        try:
            return wait_until(seen, timeout, f'{marker!r} on the serial console')
        except Timeout as e:
            raise Timeout(f'{e}; serial log ends:\n{self.log()[-3000:]}') from None

    def qmp(self, command: str, **arguments):
        if self._qmp is None:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            self._qmp = s.makefile('rw')
            json.loads(self._qmp.readline())  # greeting
            self.qmp('qmp_capabilities')
        msg = {'execute': command}
        if arguments:
            msg['arguments'] = arguments
        self._qmp.write(json.dumps(msg) + '\n')
        self._qmp.flush()
        while True:
            reply = json.loads(self._qmp.readline())
            if 'event' in reply:
                continue
            assert 'error' not in reply, f'QMP {command}: {reply["error"]}'
            return reply['return']

    def agent_ping(self, token: str, timeout: float = 20.0) -> str:
        """Ping the agent (protocol v2) on the sf-agent2 port until it replies; returns
        the command_id the reply echoes."""
        from shakenfist.agent.v2 import agent_pb2
        from sfnode.agent.v2 import split_commands
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.agent_path))
        s.settimeout(0.25)
        buf = bytearray()
        ping = agent_pb2.HypervisorToAgent(commands=[agent_pb2.HypervisorToAgentCommand(
            command_id=token, ping_request=agent_pb2.PingRequest())]).SerializeToString()
        replies = []

        def answered():
            s.sendall(ping)
            try:
                buf.extend(s.recv(65536))
            except TimeoutError:
                pass
            raw, used = split_commands(buf)
            del buf[:used]
            replies.extend(agent_pb2.AgentToHypervisorCommand.FromString(r) for r in raw)
            return any(r.command_id == token and r.WhichOneof('reply') == 'ping_reply'
                       for r in replies)
        try:
            wait_until(answered, timeout, 'a ping reply from the agent', interval=0)
        finally:
            s.close()
        return token

    def stop(self):
        if self._qmp is not None:
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.stderr.close()
        shutil.rmtree(self.sockets, ignore_errors=True)


@pytest.fixture
def boot(tmp_path):
    """boot(name, *qemu_args, agent=, reboot=) -> Guest; every qemu is killed at teardown."""
    guests = []

    def start(name, *args, **options):
        g = Guest(tmp_path, name, list(args), **options)
        guests.append(g)
        return g
    yield start
    for g in guests:
        g.stop()


def virtio_disk(image: Path) -> list[str]:
    # snapshot=on: writes go to a throw-away overlay, the built image stays as it is
    return ['-drive', f'file={image},if=virtio,format=qcow2,snapshot=on']


def sata_disks(*images: Path) -> list[str]:
    """The images on the ports of an ahci controller, the first one booting."""
    args = ['-device', 'ahci,id=ahci0']
    for i, image in enumerate(images):
        fmt = 'qcow2' if image.suffix == '.qcow2' else 'raw'
        args += ['-drive', f'file={image},if=none,id=sata{i},format={fmt},snapshot=on',
                 '-device', f'ide-hd,drive=sata{i},bus=ahci0.{i}'
                 + (',bootindex=0' if i == 0 else '')]
    return args


def config_drive_files(root: Path, hostname: str, user_data: str | None = None) -> Path:
    latest = root / 'openstack' / 'latest'
    latest.mkdir(parents=True)
    (latest / 'meta_data.json').write_text(json.dumps({
        'uuid': '2f3a6f6e-0000-4000-8000-000000000001', 'hostname': hostname, 'name': hostname,
        'public_keys': {'testkey': 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test@sf'},
    }))
    if user_data is not None:
        (latest / 'user_data').write_text(user_data)
    return root


def iso_config_drive(tmp_path: Path, hostname: str, user_data: str | None = None) -> Path:
    if not shutil.which('genisoimage'):
        pytest.skip('needs genisoimage')
    files = config_drive_files(tmp_path / 'cd-files', hostname, user_data)
    iso = tmp_path / 'config.iso'
    subprocess.run(['genisoimage', '-quiet', '-o', str(iso), '-V', 'config-2', '-J', '-r',
                    str(files)], check=True)
    return iso


def vfat_config_drive(tmp_path: Path, hostname: str) -> Path:
    if not (shutil.which('mkfs.vfat') and shutil.which('mcopy')):
        pytest.skip('needs dosfstools and mtools')
    files = config_drive_files(tmp_path / 'vfat-files', hostname)
    img = tmp_path / 'config.vfat'
    subprocess.run(['mkfs.vfat', '-C', '-n', 'config-2', str(img), '16384'],
                   check=True, capture_output=True)
    env = dict(os.environ, MTOOLS_SKIP_CHECK='1')
    subprocess.run(['mcopy', '-s', '-i', str(img), str(files / 'openstack'), '::/'],
                   check=True, env=env)
    return img


def test_boots_from_a_virtio_disk(guest_image, boot, record_property):
    g = boot('virtio', *virtio_disk(guest_image / 'sftest.qcow2'))
    ready = g.wait_for('SFTEST init: ready')
    record_property('boot_to_ready_s', round(ready, 2))
    print(f'\nvirtio disk: boot to "init: ready" in {ready:.2f} s')
    log = g.log()
    assert 'SYSLINUX' in log, 'not booted by the boot loader on the disk'
    assert log.index('SFTEST init: started') < log.index('SFTEST init: ready')
    assert 'SFTEST boot-id: ' in log
    assert 'SFTEST config-drive: none' in log
    assert 'SFTEST init: modprobe failed' not in log


def test_boots_from_a_sata_disk_and_reads_a_vfat_config_drive(guest_image, boot, tmp_path,
                                                              record_property):
    # Both disks on the ahci controller: the guest reading the config drive shows
    # that its ahci driver works, not just SeaBIOS's.
    drive = vfat_config_drive(tmp_path, 'sata-guest')
    g = boot('sata', *sata_disks(guest_image / 'sftest.qcow2', drive))
    ready = g.wait_for('SFTEST init: ready')
    record_property('boot_to_ready_s', round(ready, 2))
    print(f'\nsata disk: boot to "init: ready" in {ready:.2f} s')
    assert 'SYSLINUX' in g.log()
    assert 'SFTEST config-drive: hostname=sata-guest' in g.log()


def test_guest_markers_agent_hotplug_and_acpi_poweroff(guest_image, boot, tmp_path):
    iso = iso_config_drive(tmp_path, 'cfg-guest',
                           user_data='#!/bin/sh\necho "SFTEST user-data says hello"\n')
    g = boot('features', *virtio_disk(guest_image / 'sftest.qcow2'),
             # the config drive as libvirt attaches a cdrom on i440fx: IDE
             '-drive', f'file={iso},if=ide,index=1,media=cdrom,readonly=on',
             # a NIC with no backend: the guest sees it, no traffic leaves qemu
             '-device', 'virtio-net-pci,id=nic0,mac=52:54:00:5f:00:01',
             agent=True)
    g.wait_for('SFTEST init: ready')
    log = g.log()
    assert 'SFTEST config-drive: hostname=cfg-guest' in log
    assert 'SFTEST nic-added: eth0 52:54:00:5f:00:01' in log
    g.wait_for('SFTEST user-data says hello', timeout=10)
    g.wait_for('SFTEST user-data: exit=0', timeout=10)

    assert g.agent_ping('hello-1') == 'hello-1'

    g.qmp('device_add', driver='virtio-net-pci', id='hotnic', mac='52:54:00:5f:00:02')
    g.wait_for('SFTEST nic-added: eth1 52:54:00:5f:00:02', timeout=15)
    g.qmp('device_del', id='hotnic')
    g.wait_for('SFTEST nic-removed: eth1', timeout=15)

    # ACPI power button -> acpid -> poweroff -f -> qemu exits
    g.qmp('system_powerdown')
    g.wait_for('SFTEST acpi: power button pressed', timeout=15)
    wait_until(lambda: g.proc.poll() is not None, 20, 'qemu exit after ACPI poweroff')
    assert g.proc.returncode == 0


def test_a_reset_boots_again_from_the_disk_with_a_new_boot_id(guest_image, boot):
    g = boot('reset', *virtio_disk(guest_image / 'sftest.qcow2'), reboot=True)
    g.wait_for('SFTEST init: ready')
    g.qmp('system_reset')
    wait_until(lambda: g.log().count('SFTEST init: ready') == 2, BOOT_TIMEOUT,
               'a second "init: ready" after system_reset')
    log = g.log()
    assert log.count('SYSLINUX') == 2
    ids = [line.split()[-1] for line in log.splitlines() if line.startswith('SFTEST boot-id: ')]
    assert len(ids) == 2 and ids[0] != ids[1]
