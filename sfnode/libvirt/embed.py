"""libvirt's embedded QEMU driver (qemu:///embed): its qemu.conf, its root (one
per process), the capabilities cache shared by a host's nodes, and the host-wide
domain start lock."""

import contextlib
import fcntl
import os
import pwd
import shutil
import tempfile
import xml.etree.ElementTree as ET


# The longest embed root whose guests' monitor sockets fit in a unix socket
# path (107 bytes): <root>/lib/qemu/domain-<id>-<20 chars of name>/monitor.sock
# takes 56 more characters with a five-digit domain id.
MAX_EMBED_ROOT = 107 - len('/lib/qemu/domain-99999-') - 20 - len('/monitor.sock')


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# libvirt allows one embedded driver root per process, for the process's life
# (closing every connection does not release it).
_root_in_process: str | None = None


def claim_root(root: str):
    global _root_in_process
    _root_in_process = os.path.abspath(root)


def claimed_root() -> str | None:
    """The embed root this process opened, if any."""
    return _root_in_process


def forget_unlaunched_starts(root: str) -> list[str]:
    """Remove the status of domains whose start was cut short before QEMU ran;
    their names. Call before opening the root.

    libvirt 9.0 saves a starting domain's status (paused, "starting up", with
    an async start job) before it launches QEMU. If the process dies in that
    window, the next open loads the domain as running with pid 0, skips its
    reconnect (there is no QEMU to reconnect to) and keeps the dead start job
    for good: every later call on the domain, destroy included, times out on
    its job lock. Without the status the domain is defined and shut off, and
    starts again like any other. (A status with a pid is libvirt's own to
    recover: it kills a guest found half started.)"""
    run = os.path.join(root, 'run', 'qemu')
    forgotten = []
    for name in sorted(os.listdir(run)) if os.path.isdir(run) else []:
        path = os.path.join(run, name)
        if not name.endswith('.xml') or not os.path.isfile(path):
            continue
        try:
            status = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        if status.tag == 'domstatus' and status.get('pid', '0') == '0':
            os.unlink(path)
            forgotten.append(name[:-len('.xml')])
    return forgotten


# -- the embedded driver's configuration -------------------------------------------------

def embed_qemu_conf(display_ports: tuple[int, int] | None = None,
                    listen: str = '127.0.0.1') -> str:
    """qemu.conf for an embedded driver: QEMU runs as the node's user, with no
    cgroups, namespaces, security labels or virtlogd, so that it works in a
    container without systemd. display_ports limits the VNC/SPICE autoports
    to a range (nodes sharing a host may each have their own)."""
    lines = [
        '# Written by sfnode (sfnode/libvirt/embed.py); rewritten at every start.',
        'dynamic_ownership = 0',
        'remember_owner = 0',
        'security_driver = "none"',
        'cgroup_controllers = [ ]',
        'namespaces = [ ]',
        # QEMU writes the console log itself: no virtlogd daemon to run.
        'stdio_handler = "file"',
        'set_process_name = 1',
        f'vnc_listen = "{listen}"',
        f'spice_listen = "{listen}"',
    ]
    if os.geteuid() == 0:
        # libvirt would otherwise run QEMU as libvirt-qemu, which then could not
        # open the node's files or tap devices.
        lines[1:1] = ['user = "root"', 'group = "root"',
                      # vTPMs: libvirt runs swtpm as tss by default, which may not exist.
                      'swtpm_user = "root"', 'swtpm_group = "root"']
    if display_ports:
        lines += [f'remote_display_port_min = {display_ports[0]}',
                  f'remote_display_port_max = {display_ports[1]}']
    return '\n'.join(lines) + '\n'


@contextlib.contextmanager
def on_one_cpu():
    """Run the block with the calling thread on one CPU (the lowest it may use).

    libvirt's QEMU capabilities cache holds host CPUID data, and on some hosts
    (Firecracker VMs, for one) a leaf differs from CPU to CPU (it carries the
    APIC ID): a cache written on one CPU was thrown away, and QEMU probed again
    (4-9 s), by every open that ran on another. Opening on one CPU keeps it
    valid. Threads libvirt starts meanwhile stay on that CPU; they only handle
    monitor events. QEMU processes are started by API callers, not pinned."""
    try:
        before = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        yield
        return
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def default_start_lock() -> str:
    return os.path.join('/run/lock' if os.access('/run/lock', os.W_OK) else tempfile.gettempdir(),
                        'sfnode-domain-start.lock')


@contextlib.contextmanager
def host_lock(path: str | None):
    """An exclusive lock shared by every process on the host that uses path."""
    if not path:
        yield
        return
    fd = os.open(path, os.O_CREAT | os.O_RDONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_if_changed(path: str, content: str):
    try:
        with open(path) as f:
            if f.read() == content:
                return
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        f.write(content)
    os.replace(tmp, path)


def copy_new_files(src: str, dst: str):
    """Copy the files of src missing from dst or older there (atomically, by rename)."""
    if not os.path.isdir(src):
        return
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if not os.path.isfile(s) or name.endswith('.tmp'):
            continue
        if os.path.exists(d) and os.path.getmtime(d) >= os.path.getmtime(s):
            continue
        tmp = f'{d}.{os.getpid()}.tmp'
        shutil.copy2(s, tmp)
        os.replace(tmp, d)

