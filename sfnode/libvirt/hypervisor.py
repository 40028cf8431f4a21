"""The node's libvirt connection: domain lifecycle, hot-plug, screenshots,
statistics and lifecycle events.

By default libvirt's QEMU driver runs inside the node process
(qemu:///embed?root=<state dir>/libvirt): no daemon, all of its state under the
node's state directory, and guests that keep running when the node restarts
(a new process reopens the same root and finds them). qemu:///system and
test:///default work too.

Power state comes from libvirt's lifecycle events, which are delivered to
listeners on an asyncio loop: nothing polls. The operations are coroutines;
each runs its blocking libvirt calls in a worker thread (libvirt connections
are thread-safe), since some take a while: starting a guest about 0.3-1 s,
destroying one 1-2 s, the first open of a new embed root 4-9 s. Failures raise
HypervisorError subclasses chosen by libvirt's error code, never by its
message text."""

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import libvirt

from sfcommon.tasks import Tasks
from sfnode import domain as domainxml
from sfnode.libvirt import embed
from sfnode.libvirt.embed import (MAX_EMBED_ROOT, claim_root, copy_new_files, default_start_lock,
                                  embed_qemu_conf, host_lock, on_one_cpu, user_exists,
                                  write_if_changed)
from sfnode.libvirt.errors import (DeviceNotFound, DomainNotFound, HypervisorError,
                                   HypervisorUnavailable, libvirt_errors, translate_error)
from sfnode.libvirt.events import (EVENT_DETAILS, EVENT_NAMES, DomainEvent, DomainInfo, Listener,
                                   POWER_OFF, ensure_event_loop, power_state_of,
                                   power_state_of_event)
from sfnode.libvirt.png import PNG_SIGNATURE, ppm_to_png
from sfnode.libvirt.probe import probe_xml, xml_name
from sfnode.libvirt.usage import usage_event




LOG = logging.getLogger(__name__)
DEFAULT_EMULATOR = '/usr/bin/qemu-system-x86_64'
KVM_PROBE_FILE = 'kvm-probe.json'
KVM_PROBE_MARKER = 'SFTEST init: ready'

def _disk_targets(dom) -> list[str]:
    return [t.get('dev') for t in ET.fromstring(dom.XMLDesc(0)).findall('devices/disk/target')]


def _in_thread(method):
    """Make a blocking method a coroutine that runs it in a worker thread."""
    @functools.wraps(method)
    async def run(self, *args, **kwargs):
        return await asyncio.to_thread(method, self, *args, **kwargs)
    return run


class Hypervisor:
    """One libvirt connection and the domains on it.

    Domains are named by name (sf-<uuid>) or UUID wherever `ref` appears.
    Every operation is a coroutine; construction, listeners and close() are not."""

    def __init__(self, state_dir: str, uri: str | None = None, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_event: Listener | None = None,
                 emulator: str = DEFAULT_EMULATOR,
                 display_ports: tuple[int, int] | None = None,
                 caps_cache: str | None = None,
                 start_lock: str | None = default_start_lock()):
        """state_dir: the node's state directory (the embed root is <state_dir>/libvirt).
        loop: where listeners run; by default the loop that runs open().
        display_ports: this node's VNC/SPICE autoport range (embed only).
        caps_cache: a directory shared by nodes on one host (or by test runs)
        holding libvirt's QEMU capabilities cache, which saves the 4-9 s probe
        of QEMU at the first start of a new embed root.
        start_lock: a file locked around every domain start, shared by the
        nodes of one host (None: no lock). Each embedded driver hands out
        VNC/SPICE autoports on its own: it checks that a port is free, and
        QEMU binds it a moment later, so two nodes starting guests at once
        picked the same port and one start failed ("Address already in use").
        Starts are fast (about 0.3 s), so serialising them costs little."""
        self.state_dir = os.path.abspath(state_dir)
        self.uri = uri or f'qemu:///embed?root={os.path.join(self.state_dir, "libvirt")}'
        self.emulator = emulator
        self.display_ports = display_ports
        self.caps_cache = caps_cache
        self.start_lock = start_lock
        self._loop = loop
        self._listeners: list[Listener] = [on_event] if on_event else []
        self._tasks = Tasks('libvirt event listeners')     # async listeners under way
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self.open_seconds: float | None = None

    @classmethod
    async def connect(cls, state_dir: str, uri: str | None = None, **kwargs) -> 'Hypervisor':
        """Hypervisor(...) and open() in one."""
        return await cls(state_dir, uri, **kwargs).open()

    # -- connection --------------------------------------------------------------------

    @property
    def embed_root(self) -> str | None:
        parts = urlsplit(self.uri)
        if parts.scheme == 'qemu' and parts.path == '/embed':
            return parse_qs(parts.query).get('root', [None])[0]
        return None

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            raise HypervisorUnavailable('the hypervisor connection is not open')
        return self._conn

    async def open(self, warm: bool = True) -> 'Hypervisor':
        """Connect, and subscribe to domain events.

        warm: also make libvirt probe QEMU now (it caches the answer) rather
        than at the first domain start."""
        self._loop = self._loop or asyncio.get_running_loop()
        await asyncio.to_thread(self._open, warm)
        return self

    def _open(self, warm: bool):
        if self._conn is not None:
            return
        ensure_event_loop()
        root = self.embed_root
        if root:
            self._prepare_embed_root(root)
        start = time.monotonic()
        with on_one_cpu():
            try:
                with libvirt_errors('connect to', self.uri):
                    self._conn = libvirt.open(self.uri)
            except HypervisorError as e:
                if root and os.geteuid() == 0 and not user_exists('libvirt-qemu'):
                    # Debian's libvirt looks its default QEMU user up before it
                    # reads qemu.conf (which says root).
                    e.detail += ('; the user libvirt-qemu does not exist: '
                                 'tools/install-system.sh creates it')
                raise
            if root:
                claim_root(root)
            try:
                self._subscribe()
                if not self.uri.startswith('test:'):
                    # Keepalives notice a dead daemon; the embedded and test
                    # drivers have no peer and say so with an error.
                    with contextlib.suppress(libvirt.libvirtError):
                        self._conn.setKeepAlive(5, 3)
                if self.uri.startswith('qemu:'):
                    self._await_reconnects()
                if warm and not self.uri.startswith('test:'):
                    with libvirt_errors('probe', self.emulator):
                        self._conn.getDomainCapabilities(self.emulator, 'x86_64', 'pc', 'qemu')
                    if root and self.caps_cache:
                        copy_new_files(self._caps_dir(root), self.caps_cache)
            except BaseException:
                self.close()
                raise
        self.open_seconds = time.monotonic() - start

    def _prepare_embed_root(self, root: str):
        if len(os.path.abspath(root)) > MAX_EMBED_ROOT:
            raise HypervisorUnavailable(
                f'connect to {self.uri}: the embed root path is too long', detail=(
                    f'libvirt puts each guest\'s QEMU monitor socket at '
                    f'<root>/lib/qemu/domain-<id>-<name>/monitor.sock, and a socket path '
                    f'must fit in 107 bytes: keep the root within {MAX_EMBED_ROOT} characters'))
        claimed = embed.claimed_root()
        if claimed not in (None, os.path.abspath(root)):
            raise HypervisorUnavailable(
                f'connect to {self.uri}: this process already runs the embedded driver '
                f'of {claimed}, and libvirt allows one per process')
        write_if_changed(os.path.join(root, 'etc', 'qemu.conf'), embed_qemu_conf(self.display_ports))
        # Only before this process's driver runs: then no start of ours is under way.
        for name in embed.forget_unlaunched_starts(root) if claimed is None else []:
            LOG.warning('domain %s: its start was cut short before QEMU ran; '
                        'it is shut off now, to be started again', name)
        if self.caps_cache:
            copy_new_files(self.caps_cache, self._caps_dir(root))

    def _await_reconnects(self):
        """Wait until libvirt has reconnected to the guests that were running.

        At open the QEMU driver reconnects to each running guest's monitor in a
        thread of its own, holding a job on the domain. A destroy meanwhile
        kills the guest but loses its 'stopped' event (seen on libvirt 9.0),
        so a node could never learn the power went off. memoryStats() needs a
        job of its own, so it returns once the reconnect is done."""
        for dom in self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):
                dom.memoryStats()

    @staticmethod
    def _caps_dir(root):
        return os.path.join(root, 'cache', 'qemu', 'capabilities')

    def close(self):
        """Disconnect. Running guests keep running (and are found again by the next open).
        Async listeners still running are cancelled (`async with` also awaits them)."""
        self._tasks.cancel()
        if self._conn is None:
            return
        for cid in self._callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(cid)
        self._callback_ids = []
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
        self._conn = None

    async def __aenter__(self):
        return await self.open()

    async def __aexit__(self, *exc):
        self.close()
        await self._tasks.close()

    # -- events ------------------------------------------------------------------------

    def add_listener(self, listener: Listener):
        """Call listener(DomainEvent) on the asyncio loop for each event; it may be async."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener):
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def on_power_change(self, callback: Callable[[str, int], object]) -> Listener:
        """Call callback(domain uuid, PowerState) when an event changes a domain's power."""
        def listener(event: DomainEvent):
            if event.power_state is not None:
                return callback(event.uuid, event.power_state)
        self.add_listener(listener)
        return listener

    def _subscribe(self):
        conn = self._conn
        self._callback_ids = [
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._on_lifecycle, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT,
                                        self._on_reboot, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                                        self._on_device_removed, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                        self._on_job_completed, None),
        ]

    # These run on the libvirt event thread: build the event there (the domain
    # object is only valid during the callback) and hand it to the loop.
    def _on_lifecycle(self, _conn, dom, event, detail, _opaque):
        name = EVENT_NAMES.get(event, str(event))
        detail_name = EVENT_DETAILS.get(event, {}).get(detail, str(detail))
        self._post(DomainEvent(dom.name(), dom.UUIDString(), 'lifecycle', name, detail_name,
                               power_state_of_event(name, detail_name)))

    def _on_reboot(self, _conn, dom, _opaque):
        self._post(DomainEvent(dom.name(), dom.UUIDString(), 'reboot'))

    def _on_device_removed(self, _conn, dom, alias, _opaque):
        self._post(DomainEvent(dom.name(), dom.UUIDString(), 'device-removed', device=alias))

    def _on_job_completed(self, _conn, dom, params, _opaque):
        self._post(DomainEvent(dom.name(), dom.UUIDString(), 'job-completed', job=dict(params)))

    def _post(self, event: DomainEvent):
        loop = self._loop
        if loop is None or loop.is_closed():
            LOG.debug('no event loop for %s', event)
            return
        with contextlib.suppress(RuntimeError):      # the loop closed meanwhile
            loop.call_soon_threadsafe(self._dispatch, event)

    def _dispatch(self, event: DomainEvent):
        for listener in list(self._listeners):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    self._tasks.spawn(result, name=f'domain-event-{event.kind}')
            except Exception:
                LOG.exception('domain event listener failed on %s', event)

    # -- lookups -----------------------------------------------------------------------

    def _domain(self, ref: str, action: str) -> libvirt.virDomain:
        with libvirt_errors(action, ref):
            try:
                uuidlib.UUID(ref)
            except ValueError:
                return self.conn.lookupByName(ref)
            return self.conn.lookupByUUIDString(ref)

    def _info(self, dom: libvirt.virDomain) -> DomainInfo:
        state, _reason = dom.state()
        return DomainInfo(dom.name(), dom.UUIDString(), power_state_of(state),
                          bool(dom.isActive()), bool(dom.isPersistent()))

    @_in_thread
    def list_domains(self, prefix: str | None = domainxml.DOMAIN_PREFIX) -> list[DomainInfo]:
        """The domains, running or not, whose names start with prefix (None: all).
        A restarted node adopts its guests from this."""
        out = []
        with libvirt_errors('list domains'):
            for dom in self.conn.listAllDomains(0):
                try:
                    if prefix is None or dom.name().startswith(prefix):
                        out.append(self._info(dom))
                except libvirt.libvirtError as e:
                    # Undefined between the listing and the look: skip it.
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise translate_error(e, 'list domains') from e
        return out

    @_in_thread
    def exists(self, ref: str) -> bool:
        try:
            self._domain(ref, 'look up')
        except DomainNotFound:
            return False
        return True

    @_in_thread
    def domain_info(self, ref: str) -> DomainInfo:
        dom = self._domain(ref, 'look up')
        with libvirt_errors('look up', ref):
            return self._info(dom)

    async def power_state(self, ref: str) -> int:
        """The PowerState libvirt reports now (for adoption; events say when it changes)."""
        return (await self.domain_info(ref)).power_state

    @_in_thread
    def domain_xml(self, ref: str, inactive: bool = False) -> str:
        dom = self._domain(ref, 'read')
        with libvirt_errors('read', ref):
            return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)

    # -- lifecycle ---------------------------------------------------------------------

    @_in_thread
    def define(self, xml: str, start: bool = False) -> DomainInfo:
        """Define (or redefine) a persistent domain, and start it unless running when start.
        A running domain keeps running; its new definition applies from its next start."""
        name = xml_name(xml)
        with libvirt_errors('define', name):
            dom = self.conn.defineXML(xml)
        if start:
            with libvirt_errors('start', name):
                if not dom.isActive():
                    with host_lock(self.start_lock):
                        dom.create()
        with libvirt_errors('define', name):
            return self._info(dom)

    async def define_and_start(self, xml: str) -> DomainInfo:
        return await self.define(xml, start=True)

    @_in_thread
    def start(self, ref: str):
        dom = self._domain(ref, 'start')
        with libvirt_errors('start', ref), host_lock(self.start_lock):
            dom.create()

    @_in_thread
    def destroy(self, ref: str) -> bool:
        """Power off at once. False if the domain was not running."""
        dom = self._domain(ref, 'destroy')
        with libvirt_errors('destroy', ref):
            if not dom.isActive():
                return False
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                # It stopped between the check and the destroy.
                if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return False
                raise
            return True

    @_in_thread
    def undefine(self, ref: str, remove_nvram: bool = True):
        """Forget the domain (a running one becomes transient: destroy it first)."""
        dom = self._domain(ref, 'undefine')
        with libvirt_errors('undefine', ref):
            flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                     | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            # The NVRAM flags only where there is NVRAM: drivers without UEFI
            # support (the test driver) refuse them.
            if ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).find('os/nvram') is not None:
                flags |= (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if remove_nvram
                          else libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
            dom.undefineFlags(flags)

    @_in_thread
    def shutdown(self, ref: str):
        """Press the ACPI power button (the guest decides what happens)."""
        dom = self._domain(ref, 'shut down')
        with libvirt_errors('shut down', ref):
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

    @_in_thread
    def reboot(self, ref: str):
        """An ACPI reboot: the power button, then libvirt restarts the guest when it powers off."""
        dom = self._domain(ref, 'reboot')
        with libvirt_errors('reboot', ref):
            dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)

    @_in_thread
    def reset(self, ref: str):
        """A hard reset, like the reset button."""
        dom = self._domain(ref, 'reset')
        with libvirt_errors('reset', ref):
            dom.reset(0)

    @_in_thread
    def suspend(self, ref: str):
        dom = self._domain(ref, 'pause')
        with libvirt_errors('pause', ref):
            dom.suspend()

    @_in_thread
    def resume(self, ref: str):
        dom = self._domain(ref, 'resume')
        with libvirt_errors('resume', ref):
            dom.resume()

    # -- hot-plug ----------------------------------------------------------------------

    def _affect(self, dom) -> int:
        # The persistent definition always; the running guest when there is one.
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        return flags

    @_in_thread
    def attach_interface(self, ref: str, xml: str):
        """Plug a NIC (domain.interface_xml()) into the running guest and its definition."""
        dom = self._domain(ref, 'attach an interface to')
        with libvirt_errors('attach an interface to', ref):
            dom.attachDeviceFlags(xml, self._affect(dom))

    @_in_thread
    def detach_interface(self, ref: str, mac: str):
        """Unplug the NIC with this MAC. The guest acknowledges the unplug
        asynchronously: a 'device-removed' event says when it is gone."""
        dom = self._domain(ref, 'detach an interface from')
        with libvirt_errors('detach an interface from', ref):
            flags = self._affect(dom)
            for iface in self._devices(dom).findall('interface'):
                found = iface.find('mac')
                if found is not None and found.get('address', '').lower() == mac.lower():
                    # The device as libvirt knows it, without the live-only
                    # parts: the same XML must match the persistent definition.
                    for tag in ('alias', 'address', 'target'):
                        for child in iface.findall(tag):
                            iface.remove(child)
                    dom.detachDeviceFlags(ET.tostring(iface, encoding='unicode'), flags)
                    return
        raise DeviceNotFound(f'detach an interface from {ref}: {DeviceNotFound.summary}',
                             detail=f'no interface with MAC {mac}')

    @_in_thread
    def interface_macs(self, ref: str) -> list[str]:
        """The MACs of the domain's NICs (the running guest's, or the definition's)."""
        dom = self._domain(ref, 'read')
        with libvirt_errors('read', ref):
            return [m.get('address') for m in self._devices(dom).findall('interface/mac')]

    # -- screen ------------------------------------------------------------------------

    @_in_thread
    def screenshot(self, ref: str) -> bytes:
        """The guest's first screen as PNG."""
        dom = self._domain(ref, 'take a screenshot of')
        with libvirt_errors('take a screenshot of', ref):
            stream = self.conn.newStream(0)
            try:
                mime = dom.screenshot(stream, 0, 0)
                chunks = []
                while data := stream.recv(262144):
                    chunks.append(data)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise
        image = b''.join(chunks)
        if mime == 'image/png' or image.startswith(PNG_SIGNATURE):
            return image
        return ppm_to_png(image)

    # -- disks -------------------------------------------------------------------------

    async def backup_disk(self, ref: str, device: str, target: str):
        """Copy a running domain's disk as it is now into a new qcow2 file, whole (its
        backing chain flattened), while the guest runs on: libvirt's push-mode backup,
        whose end comes as a job-completed event. A backup still running that this
        call did not start (the node was restarted mid-copy: QEMU copies on without
        libvirt) is aborted first, since a domain has one backup job at a time."""
        with self._job_end(ref) as ended:     # listened for before the look: not missed
            if await asyncio.to_thread(self._abort_backup_job, ref):
                LOG.warning('%s: a backup left running (by a restart mid-copy) is aborted', ref)
                await asyncio.wait_for(ended, 60)
                await asyncio.to_thread(self._backup_settled, ref)
        with self._job_end(ref) as ended:
            await asyncio.to_thread(self._backup_begin, ref, device, target)
            job = await ended
        await asyncio.to_thread(self._backup_settled, ref)
        if not job.get('success'):
            raise HypervisorError(f'backing up {device} of {ref} failed: '
                                  f'{job.get("errmsg") or "the job did not succeed"}')

    @contextlib.contextmanager
    def _job_end(self, ref: str):
        """A future of how the domain's next job ends (libvirt's job-completed event, or
        the domain stopping), for as long as the block runs."""
        ended = asyncio.get_running_loop().create_future()

        def listener(event: DomainEvent):
            if ref in (event.name, event.uuid) and not ended.done() and (
                    event.kind == 'job-completed' or event.power_state == POWER_OFF):
                ended.set_result(event.job or {'success': False, 'errmsg': 'the domain stopped'})
        self.add_listener(listener)
        try:
            yield ended
        finally:
            self.remove_listener(listener)

    def _abort_backup_job(self, ref) -> bool:
        """Abort the domain's backup job; False if it had none."""
        dom = self._domain(ref, 'back up')
        with libvirt_errors('back up', ref):
            try:
                dom.backupGetXMLDesc(0)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
                    return False
                raise
            try:
                dom.abortJob()
            except libvirt.libvirtError as e:
                # It ended between the look and the abort: its job-completed event is coming.
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
        return True

    def _backup_settled(self, ref):
        """Return once libvirt has closed the backup's target. It sends job-completed
        before it detaches the target from QEMU, whose qcow2 metadata (its L1 and L2
        tables) is only then written: a copy read at once was broken in 13 of 15 tries.
        libvirt does both under one domain job; a call that needs a job of its own
        (memoryStats) returns after it."""
        with contextlib.suppress(libvirt.libvirtError):     # gone meanwhile: the copy fails its check
            self._domain(ref, 'back up').memoryStats()

    def _backup_begin(self, ref, device, target):
        dom = self._domain(ref, 'back up')
        root = ET.Element('domainbackup', mode='push')
        disk = ET.SubElement(ET.SubElement(root, 'disks'), 'disk', name=device, backup='yes', type='file')
        ET.SubElement(disk, 'driver', type='qcow2')
        ET.SubElement(disk, 'target', file=target)
        for other in _disk_targets(dom):
            if other != device:
                ET.SubElement(root.find('disks'), 'disk', name=other, backup='no')
        with libvirt_errors('back up', ref):
            dom.backupBegin(ET.tostring(root, encoding='unicode'), None, 0)

    # -- statistics --------------------------------------------------------------------

    @staticmethod
    def _devices(dom) -> ET.Element:
        return ET.fromstring(dom.XMLDesc(0)).find('devices')

    @staticmethod
    def _block_stats(dom, devices) -> dict[str, dict[str, int]]:
        out = {}
        for disk in devices.findall('disk'):
            dev = disk.find('target').get('dev')
            rd_req, rd_bytes, wr_req, wr_bytes, errs = dom.blockStats(dev)
            out[dev] = dict(rd_req=rd_req, rd_bytes=rd_bytes, wr_req=wr_req,
                            wr_bytes=wr_bytes, errs=errs)
        return out

    @staticmethod
    def _interface_stats(dom, devices) -> dict[str, dict[str, int | str]]:
        keys = ('rx_bytes', 'rx_packets', 'rx_errs', 'rx_drop',
                'tx_bytes', 'tx_packets', 'tx_errs', 'tx_drop')
        out = {}
        for iface in devices.findall('interface'):
            mac = iface.find('mac').get('address')
            target = iface.find('target')
            dev = target.get('dev') if target is not None else mac
            out[mac] = dict(zip(keys, dom.interfaceStats(dev)), device=dev)
        return out

    @staticmethod
    def _cpu_stats(dom) -> dict[str, int]:
        _state, _max_kib, mem_kib, vcpus, cpu_time = dom.info()
        return dict(cpu_time_ns=cpu_time, vcpus=vcpus, memory_kib=mem_kib)

    @_in_thread
    def block_stats(self, ref: str) -> dict[str, dict[str, int]]:
        """Counters by guest disk (vda...): rd_req, rd_bytes, wr_req, wr_bytes, errs.
        NVMe disks (QEMU command line devices) are not listed."""
        dom = self._domain(ref, 'read statistics of')
        with libvirt_errors('read disk statistics of', ref):
            return self._block_stats(dom, self._devices(dom))

    @_in_thread
    def interface_stats(self, ref: str) -> dict[str, dict[str, int | str]]:
        """Counters by MAC address (and the host device): rx/tx bytes, packets, errs, drop."""
        dom = self._domain(ref, 'read statistics of')
        with libvirt_errors('read interface statistics of', ref):
            return self._interface_stats(dom, self._devices(dom))

    @_in_thread
    def cpu_stats(self, ref: str) -> dict[str, int]:
        """cpu_time_ns (all vCPUs together), vcpus, memory_kib."""
        dom = self._domain(ref, 'read statistics of')
        with libvirt_errors('read cpu statistics of', ref):
            return self._cpu_stats(dom)

    @_in_thread
    def usage(self, ref: str) -> dict | None:
        """All three, for a usage event; None when the domain is not running."""
        dom = self._domain(ref, 'read statistics of')
        with libvirt_errors('read statistics of', ref):
            if not dom.isActive():
                return None
            devices = self._devices(dom)
            return usage_event(dom, self._cpu_stats(dom), self._block_stats(dom, devices),
                                self._interface_stats(dom, devices))

    # -- KVM or TCG --------------------------------------------------------------------

    @_in_thread
    def probe_kvm(self, image: str | None, marker: str = KVM_PROBE_MARKER,
                  timeout: float = 20.0, force: bool = False) -> str:
        """'kvm' if a probe guest boots under KVM, else 'qemu' (TCG).

        /dev/kvm existing, and libvirt advertising KVM, do not mean KVM works:
        under some nested hypervisors guests die at once with an emulation
        failure. So boot image (a BIOS-bootable disk whose serial console prints
        marker once booted: guest/build-image.sh makes one) under KVM, and use
        KVM only if the marker appears within timeout seconds with the guest
        still running. Without an image, TCG. The answer is kept in the state
        directory, keyed by what could change it (kernel, QEMU, libvirt, image)."""
        if not os.access('/dev/kvm', os.R_OK | os.W_OK) or not image:
            return 'qemu'
        cache_path = os.path.join(self.state_dir, KVM_PROBE_FILE)
        key = {
            'kernel': os.uname().release,
            'emulator_mtime': os.stat(self.emulator).st_mtime,
            'libvirt': self.conn.getLibVersion(),
            'image': os.path.abspath(image),
            'image_mtime': os.stat(image).st_mtime,
        }
        if not force:
            try:
                with open(cache_path) as f:
                    cached = json.load(f)
                if cached.get('key') == key:
                    return cached['domain_type']
            except (FileNotFoundError, ValueError, KeyError):
                pass
        started = time.monotonic()
        result, why = self._boot_probe(image, marker, timeout)
        record = {'key': key, 'domain_type': result, 'why': why,
                  'seconds': round(time.monotonic() - started, 2), 'time': time.time()}
        LOG.info('KVM probe: %s (%s) in %.1fs', result, why, record['seconds'])
        write_if_changed(cache_path, json.dumps(record, indent=2) + '\n')
        return result

    def _boot_probe(self, image: str, marker: str, timeout: float) -> tuple[str, str]:
        workdir = os.path.join(self.state_dir, 'kvm-probe')
        os.makedirs(workdir, exist_ok=True)
        log_path = os.path.join(workdir, 'console.log')
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_path)
        name = f'sfprobe-kvm-{os.getpid()}'
        xml = probe_xml(name, image, log_path, self.emulator)
        try:
            with libvirt_errors('start', name):
                dom = self.conn.createXML(xml, 0)      # transient: gone once destroyed
        except HypervisorError as e:
            return 'qemu', f'start failed: {e}'
        try:
            deadline = time.monotonic() + timeout
            want = marker.encode()
            while time.monotonic() < deadline:
                state, _ = dom.state()
                if state != libvirt.VIR_DOMAIN_RUNNING:
                    return 'qemu', f'guest stopped running (state {state})'
                with contextlib.suppress(FileNotFoundError), open(log_path, 'rb') as f:
                    if want in f.read():
                        return 'kvm', 'marker seen'
                # A bounded one-off probe at node start: polling a file is fine here.
                time.sleep(0.1)
            return 'qemu', f'no marker within {timeout}s'
        except libvirt.libvirtError as e:
            return 'qemu', f'guest vanished: {e.get_error_message()}'
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()

