"""Libvirt domain XML for a DesiredInstance.

build_domain_xml() turns what the controller wants (a DesiredInstance) plus
what only the node knows (file paths, bridges, ports, the hypervisor's
abilities) into a <domain> document; interface_xml() makes the <interface>
for hot-plugging one NIC. Both build the tree with ElementTree, so values are
always escaped and no template can drift out of step with the code.

The disk layout (device names, buses) comes from disk_layout(), which is
deterministic: a node that restarts and rebuilds the XML gets the same names,
and reports them to the controller through DiskSlot.to_pb().
"""

import dataclasses
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_pb2, network_pb2, specs_pb2, wire_pb2

QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'
ET.register_namespace('qemu', QEMU_NS)

DOMAIN_PREFIX = 'sf-'
AGENT2_CHANNEL = 'sf-agent2'
AGENT1_CHANNEL = 'sf-agent'
# Linux interface names are at most 15 characters (IFNAMSIZ 16 with the NUL).
IFNAMSIZ = 15
# Free pcie-root-ports left on q35 so NICs can be hot-plugged later (on q35 a
# PCIe device needs a root port of its own and libvirt only adds as many as
# the domain's devices use).
Q35_HOTPLUG_PORTS = 4


class UnsupportedSpec(ValueError):
    """The instance asks for something this node cannot build."""


def wire_name(enum_type, value: int) -> str:
    """The wire string of an enum value ('virtio', 'sata'...); '' for unspecified."""
    if not value:
        return ''
    return enum_type.DESCRIPTOR.values_by_number[value].GetOptions().Extensions[
        wire_pb2.wire_value]


def domain_name(instance_uuid: str) -> str:
    return DOMAIN_PREFIX + instance_uuid


def tap_name(interface_uuid: str) -> str:
    """'tap-' and the start of the interface UUID: unique enough, and <= 15 chars."""
    return ('tap-' + interface_uuid.replace('-', ''))[:IFNAMSIZ]


# -- inputs that only the node knows ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class InstancePaths:
    """Where an instance's files are on the node."""
    # One image per entry of instance.disk_spec, in order.
    disks: Sequence[str]
    # The config drive image (raw), or None for no config drive.
    config_drive: str | None
    # The serial console log (appended to across restarts).
    console_log: str
    # The unix socket QEMU serves the serial console on (the node shares it: console.py).
    console_socket: str
    # The unix socket of the sf-agent2 virtio-serial port (used when there is no vsock).
    agent_socket: str
    # The unix socket of the legacy sf-agent port.
    legacy_agent_socket: str | None = None
    # Image formats by disk index; default qcow2 for disks, raw for cdroms.
    disk_formats: Mapping[int, str] = dataclasses.field(default_factory=dict)
    # The UEFI variable store (NVRAM) of a UEFI instance, kept with the instance.
    nvram: str | None = None

    @classmethod
    def under(cls, directory: str, instance: instance_pb2.Instance) -> 'InstancePaths':
        """The conventional layout of one instance directory.

        Unix socket paths are limited to 107 bytes: keep the directory short."""
        cdroms = {i for i, d in enumerate(instance.disk_spec) if d.type == specs_pb2.DISK_TYPE_CDROM}
        return cls(
            disks=[os.path.join(directory, f'disk{i}.{"iso" if i in cdroms else "qcow2"}')
                   for i in range(len(instance.disk_spec))],
            config_drive=(None if instance.configdrive == instance_pb2.CONFIG_DRIVE_NONE
                          else os.path.join(directory, 'config.img')),
            console_log=os.path.join(directory, 'console.log'),
            console_socket=os.path.join(directory, 'console.sock'),
            agent_socket=os.path.join(directory, 'agent2.sock'),
            legacy_agent_socket=os.path.join(directory, 'agent.sock'),
            nvram=os.path.join(directory, 'nvram.fd'))


@dataclasses.dataclass(frozen=True)
class DomainOptions:
    """How this node builds domains."""
    # 'qemu' (TCG) or 'kvm': see Hypervisor.probe_kvm().
    domain_type: str = 'qemu'
    # The Linux bridge of each network, by network UUID.
    bridges: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Whether the host has /dev/vhost-vsock; the CID defaults to the desired one.
    vsock: bool = False
    vsock_cid: int | None = None
    emulator: str = '/usr/bin/qemu-system-x86_64'
    # Where the serial console and the VNC/SPICE server listen.
    console_listen: str = '127.0.0.1'
    vdi_listen: str = '127.0.0.1'
    # A fixed VNC/SPICE port allocated by the node, or None for libvirt's autoport.
    vdi_port: int | None = None
    # The VNC or SPICE password (VNC reads its first 8 characters); '' for none.
    vdi_password: str = ''
    q35_hotplug_ports: int = Q35_HOTPLUG_PORTS
    # Debian's OVMF (package ovmf): the UEFI firmware and NVRAM templates.
    ovmf_dir: str = '/usr/share/OVMF'
    # The instance's own NVRAM template (its nvram_template blob, fetched), else OVMF's.
    nvram_template: str | None = None


# -- disks -----------------------------------------------------------------------------

# bus wire name -> (device name prefix, libvirt bus)
_BUSES = {
    'virtio': ('vd', 'virtio'),
    'sata': ('sd', 'sata'),
    'scsi': ('sd', 'scsi'),
    'usb': ('sd', 'usb'),
    # libvirt 9.0 has no NVMe disk bus (domcapabilities lists ide, fdc, scsi,
    # virtio, usb, sata): NVMe disks are QEMU nvme devices added on the command
    # line, as Shaken Fist does, named nvme0, nvme1... (see _nvme_args).
    'nvme': ('nvme', None),
}
# Buses on which libvirt accepts a read-only disk (it refuses read-only IDE and
# SATA hard disks, because QEMU's AHCI cannot make one read-only).
_READONLY_BUSES = {'virtio', 'scsi', 'usb'}


@dataclasses.dataclass(frozen=True)
class DiskSlot:
    """One block device of a domain."""
    index: int | None         # position in instance.disk_spec; None for the config drive
    device: str               # guest device name: vda, sdb, nvme0
    bus: str                  # wire name: virtio, sata, scsi, usb, nvme
    present_as: str           # 'disk' or 'cdrom'
    path: str
    format: str               # qcow2 or raw
    readonly: bool = False
    size: int | None = None   # GiB, as requested
    config_drive: bool = False

    def to_pb(self, blob_uuid: str | None = None) -> instance_pb2.Disk:
        """The Disk a node reports for this slot (ReportInstanceStatus.disks)."""
        bus = {'virtio': specs_pb2.DISK_BUS_VIRTIO, 'sata': specs_pb2.DISK_BUS_SATA,
               'scsi': specs_pb2.DISK_BUS_SCSI, 'usb': specs_pb2.DISK_BUS_USB,
               'nvme': specs_pb2.DISK_BUS_NVME}[self.bus]
        disk = instance_pb2.Disk(device=self.device, bus=bus,
                                 snapshot_ignores=self.config_drive or self.present_as == 'cdrom')
        if self.size is not None:
            disk.size = self.size
        if blob_uuid:
            disk.blob_uuid = blob_uuid
        return disk


def _device_letters(n: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa: the scheme libvirt and Linux use for vdX/sdX."""
    letters = ''
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord('a') + r) + letters
    return letters


def disk_layout(instance: instance_pb2.Instance, paths: InstancePaths) -> list[DiskSlot]:
    """The instance's disks in guest order: the requested ones, then the config drive."""
    if len(paths.disks) != len(instance.disk_spec):
        raise ValueError(f'{len(instance.disk_spec)} disks requested but '
                         f'{len(paths.disks)} disk paths given')
    counters: dict[str, int] = {}

    def name(prefix):
        n = counters.get(prefix, 0)
        counters[prefix] = n + 1
        return f'nvme{n}' if prefix == 'nvme' else prefix + _device_letters(n)

    slots = []
    for i, spec in enumerate(instance.disk_spec):
        bus = wire_name(specs_pb2.DiskBus, spec.bus) or 'virtio'
        if bus not in _BUSES:
            raise UnsupportedSpec(f'disk {i}: bus {bus} is not supported')
        cdrom = spec.type == specs_pb2.DISK_TYPE_CDROM
        # QEMU has no removable media on virtio-blk or NVMe: such cdroms go on
        # SATA (Shaken Fist uses USB; SATA is faster and every OS has a driver).
        if cdrom and bus in ('virtio', 'nvme'):
            bus = 'sata'
        slots.append(DiskSlot(
            index=i, device=name(_BUSES[bus][0]), bus=bus,
            present_as='cdrom' if cdrom else 'disk', path=paths.disks[i],
            format=paths.disk_formats.get(i, 'raw' if cdrom else 'qcow2'),
            readonly=cdrom, size=spec.size if spec.HasField('size') else None))

    if paths.config_drive:
        # On the first disk's bus, as Shaken Fist does, so a guest that can
        # read its root disk can read its config drive too.
        first = wire_name(specs_pb2.DiskBus, instance.disk_spec[0].bus) if instance.disk_spec else ''
        bus = first if first in ('sata', 'scsi', 'usb') else 'virtio'
        slots.append(DiskSlot(index=None, device=name(_BUSES[bus][0]), bus=bus,
                              present_as='disk', path=paths.config_drive, format='raw',
                              readonly=bus in _READONLY_BUSES, config_drive=True))
    return slots


def _disk_element(devices, slot: DiskSlot, boot_order: int | None):
    disk = ET.SubElement(devices, 'disk', type='file', device=slot.present_as)
    driver = ET.SubElement(disk, 'driver', name='qemu', type=slot.format)
    if not slot.readonly:
        driver.set('discard', 'unmap')
    ET.SubElement(disk, 'source', file=slot.path)
    ET.SubElement(disk, 'target', dev=slot.device, bus=_BUSES[slot.bus][1])
    if slot.readonly:
        ET.SubElement(disk, 'readonly')
    if boot_order:
        ET.SubElement(disk, 'boot', order=str(boot_order))


def _nvme_args(slot: DiskSlot, n: int, boot: bool, q35: bool) -> list[str]:
    drive = f'sfnvme{n}'
    # libvirt does not know about these devices, so they get fixed slots far
    # from the ones libvirt hands out from the bottom up (without an address
    # QEMU gave an NVMe device slot 2, which libvirt had given to the video
    # card). On q35 they are integrated endpoints of pcie.0: libvirt uses
    # slots 1-4 and 0x1e-0x1f there.
    address = f'bus=pcie.0,addr={0x10 + n:#x}' if q35 else f'bus=pci.0,addr={0x1f - n:#x}'
    device = f'nvme,drive={drive},serial={slot.device},{address}'
    if boot:
        device += ',bootindex=1'
    # Commas in a path are doubled for QEMU's option parser.
    return ['-drive', f'file={slot.path.replace(",", ",,")},format={slot.format},'
            f'if=none,id={drive},discard=unmap',
            '-device', device]


# -- NICs ---------------------------------------------------------------------------------

def nic_model(model: int) -> str:
    """The libvirt <model type> of a NicModel: its wire name, which is QEMU's device name."""
    return wire_name(specs_pb2.NicModel, model) or 'virtio'


def interface_element(iface: network_pb2.NetworkInterface, bridge: str) -> ET.Element:
    el = ET.Element('interface', type='bridge')
    ET.SubElement(el, 'mac', address=iface.macaddr)
    ET.SubElement(el, 'source', bridge=bridge)
    ET.SubElement(el, 'target', dev=tap_name(iface.uuid))
    ET.SubElement(el, 'model', type=nic_model(iface.model))
    return el


def interface_xml(iface: network_pb2.NetworkInterface, bridge: str) -> str:
    """The <interface> to hot-plug one NIC (Hypervisor.attach_interface)."""
    return ET.tostring(interface_element(iface, bridge), encoding='unicode')


def _live_interfaces(instance: instance_pb2.Instance):
    gone = {network_pb2.NETWORK_INTERFACE_STATE_DELETED, network_pb2.NETWORK_INTERFACE_STATE_ERROR}
    return sorted((i for i in instance.interfaces if i.state not in gone), key=lambda i: i.order)


# -- the domain --------------------------------------------------------------------------

def build_domain_xml(desired: node_pb2.DesiredInstance, paths: InstancePaths,
                     options: DomainOptions) -> str:
    inst = desired.instance
    if not inst.uuid:
        raise ValueError('the instance has no uuid')
    if options.domain_type not in ('qemu', 'kvm'):
        raise ValueError(f'domain type {options.domain_type!r}: expected qemu or kvm')
    q35 = inst.machine_type == instance_pb2.MACHINE_TYPE_Q35

    dom = _machine(inst, options, q35)
    if inst.uefi or inst.secure_boot:
        _uefi(dom, inst, paths, options)
    devices = ET.SubElement(dom, 'devices')
    ET.SubElement(devices, 'emulator').text = options.emulator
    qemu_args = _disks(devices, disk_layout(inst, paths), q35)
    _nics(devices, inst, options.bridges)
    _serial_console(devices, paths)
    _side_channels(devices, desired, paths, options)
    qemu_env = _graphics(devices, inst.video, options)
    ET.SubElement(devices, 'memballoon', model='none')
    if inst.vtpm:
        # libvirt starts swtpm for it and keeps its state (under the node's libvirt root).
        tpm = ET.SubElement(devices, 'tpm', model='tpm-crb')
        ET.SubElement(tpm, 'backend', type='emulator', version='2.0')
    if q35:
        _q35_controllers(devices, options.q35_hotplug_ports)

    if qemu_args or qemu_env:
        cmdline = ET.SubElement(dom, f'{{{QEMU_NS}}}commandline')
        for arg in qemu_args:
            ET.SubElement(cmdline, f'{{{QEMU_NS}}}arg', value=arg)
        for key, value in qemu_env.items():
            ET.SubElement(cmdline, f'{{{QEMU_NS}}}env', name=key, value=value)

    ET.indent(dom)
    return ET.tostring(dom, encoding='unicode')


def _machine(inst: instance_pb2.Instance, options: DomainOptions, q35: bool) -> ET.Element:
    """The <domain> with everything but its devices."""
    dom = ET.Element('domain', type=options.domain_type)
    ET.SubElement(dom, 'name').text = domain_name(inst.uuid)
    ET.SubElement(dom, 'uuid').text = inst.uuid
    ET.SubElement(dom, 'title').text = inst.name
    ET.SubElement(dom, 'memory', unit='MiB').text = str(inst.memory)
    ET.SubElement(dom, 'currentMemory', unit='MiB').text = str(inst.memory)
    ET.SubElement(dom, 'vcpu', placement='static').text = str(inst.cpus or 1)

    os_el = ET.SubElement(dom, 'os')
    ET.SubElement(os_el, 'type', arch='x86_64', machine='q35' if q35 else 'pc').text = 'hvm'
    features = ET.SubElement(dom, 'features')
    ET.SubElement(features, 'acpi')
    ET.SubElement(features, 'apic')
    # KVM: the host's CPU as it is. TCG: every feature QEMU can emulate, so
    # images built for x86-64-v2 or later boot (the default qemu64 lacks SSE4.2
    # and POPCNT); measured to boot as fast as qemu64.
    ET.SubElement(dom, 'cpu', mode='host-passthrough' if options.domain_type == 'kvm' else 'maximum')
    clock = ET.SubElement(dom, 'clock', offset='utc')
    ET.SubElement(clock, 'timer', name='rtc', tickpolicy='catchup')
    ET.SubElement(clock, 'timer', name='pit', tickpolicy='delay')
    ET.SubElement(clock, 'timer', name='hpet', present='no')
    ET.SubElement(dom, 'on_poweroff').text = 'destroy'
    ET.SubElement(dom, 'on_reboot').text = 'restart'
    ET.SubElement(dom, 'on_crash').text = 'destroy'
    pm = ET.SubElement(dom, 'pm')
    ET.SubElement(pm, 'suspend-to-mem', enabled='no')
    ET.SubElement(pm, 'suspend-to-disk', enabled='no')
    return dom


# (firmware, NVRAM template) in the OVMF directory: plain UEFI, and secure boot with
# Microsoft's and Debian's keys enrolled (so Debian's signed shim, GRUB and kernel boot).
OVMF_PLAIN = ('OVMF_CODE_4M.fd', 'OVMF_VARS_4M.fd')
OVMF_SECURE = ('OVMF_CODE_4M.secboot.fd', 'OVMF_VARS_4M.ms.fd')


def _uefi(dom: ET.Element, inst: instance_pb2.Instance, paths: 'InstancePaths', options: DomainOptions):
    """OVMF from pflash, and the instance's own NVRAM (libvirt copies the template into
    it once; it then keeps the guest's boot entries and keys across power cycles).
    Secure boot needs q35 (the controller sets it) and SMM."""
    if inst.nvram_template and not options.nvram_template:
        raise UnsupportedSpec(f'nvram_template: blob {inst.nvram_template} was not fetched')
    if inst.secure_boot and inst.machine_type != instance_pb2.MACHINE_TYPE_Q35:
        raise UnsupportedSpec('secure boot needs the q35 machine type')
    code, variables = (os.path.join(options.ovmf_dir, f) for f in (OVMF_SECURE if inst.secure_boot else OVMF_PLAIN))
    for path in (code, variables):
        if not os.path.exists(path):
            raise UnsupportedSpec(f'UEFI firmware {path} is missing on this node (Debian package ovmf)')
    os_el = dom.find('os')
    ET.SubElement(os_el, 'loader', readonly='yes', type='pflash',
                  secure='yes' if inst.secure_boot else 'no').text = code
    ET.SubElement(os_el, 'nvram', template=options.nvram_template or variables).text = paths.nvram
    if inst.secure_boot:
        ET.SubElement(dom.find('features'), 'smm', state='on')


def _disks(devices: ET.Element, slots: list[DiskSlot], q35: bool) -> list[str]:
    """The disks, booting from the first; returns the QEMU arguments of NVMe ones.

    Boot order is per device. When the first disk is an NVMe one (bootindex=1
    on the command line) the first libvirt disk still needs an order of its
    own: without one libvirt gives it bootindex=1, and QEMU refuses the pair."""
    qemu_args = []
    first_libvirt_disk = next((s for s in slots if s.bus != 'nvme'), None)
    nvme = 0
    for n, slot in enumerate(slots):
        if slot.bus == 'nvme':
            qemu_args += _nvme_args(slot, nvme, boot=n == 0, q35=q35)
            nvme += 1
        else:
            order = (1 if n == 0 else 2) if slot is first_libvirt_disk else None
            _disk_element(devices, slot, boot_order=order)
    if any(s.bus == 'scsi' for s in slots):
        ET.SubElement(devices, 'controller', type='scsi', index='0', model='virtio-scsi')
    return qemu_args


def _nics(devices: ET.Element, inst: instance_pb2.Instance, bridges: Mapping[str, str]):
    """The NICs, in interface order, each on its network's bridge."""
    for iface in _live_interfaces(inst):
        bridge = bridges.get(iface.network_uuid)
        if not bridge:
            raise ValueError(f'interface {iface.uuid}: no bridge for network {iface.network_uuid}')
        devices.append(interface_element(iface, bridge))


def _serial_console(devices: ET.Element, paths: 'InstancePaths'):
    """One serial port: a unix socket QEMU serves (the node shares it with the
    viewers it admits, sfnode/console.py), also logged to a file so that it is
    readable after the fact. The <console> is libvirt's alias of that port, not
    a second device."""
    for tag, target in (('serial', {'port': '0'}), ('console', {'type': 'serial', 'port': '0'})):
        chardev = ET.SubElement(devices, tag, type='unix')
        ET.SubElement(chardev, 'source', mode='bind', path=paths.console_socket)
        ET.SubElement(chardev, 'log', file=paths.console_log, append='on')
        ET.SubElement(chardev, 'target', **target)


def _side_channels(devices: ET.Element, desired: node_pb2.DesiredInstance,
                   paths: InstancePaths, options: DomainOptions):
    channels = set(desired.instance.side_channels)
    if instance_pb2.SIDE_CHANNEL_SF_AGENT2 in channels:
        cid = options.vsock_cid or desired.vsock_cid
        if options.vsock and cid:
            vsock = ET.SubElement(devices, 'vsock', model='virtio')
            ET.SubElement(vsock, 'cid', auto='no', address=str(cid))
        else:
            # No vhost-vsock on the host: the same stream on a virtio-serial port.
            _unix_channel(devices, paths.agent_socket, AGENT2_CHANNEL)
    if instance_pb2.SIDE_CHANNEL_SF_AGENT in channels:
        if not paths.legacy_agent_socket:
            raise ValueError('the sf-agent side channel needs paths.legacy_agent_socket')
        _unix_channel(devices, paths.legacy_agent_socket, AGENT1_CHANNEL)


def _graphics(devices: ET.Element, video: specs_pb2.VideoSpec, options: DomainOptions) -> dict:
    """The VDI server and the video card; returns environment QEMU needs."""
    env = {}
    vdi = wire_name(specs_pb2.VdiType, video.vdi) or 'spice'
    port = ({'port': str(options.vdi_port), 'autoport': 'no'} if options.vdi_port
            else {'port': '-1', 'autoport': 'yes'})
    secret = {'passwd': options.vdi_password} if options.vdi_password else {}
    if vdi == 'vnc':
        secret['sharePolicy'] = 'force-shared'      # several viewers never disconnect each other
    graphics = ET.SubElement(devices, 'graphics', type='vnc' if vdi == 'vnc' else 'spice',
                             listen=options.vdi_listen, **port, **secret)
    ET.SubElement(graphics, 'listen', type='address', address=options.vdi_listen)
    if vdi != 'vnc':
        # The SPICE guest agent's channel (clipboard, display resizing).
        channel = ET.SubElement(devices, 'channel', type='spicevmc')
        ET.SubElement(channel, 'target', type='virtio', name='com.redhat.spice.0')
    if vdi == 'spiceconcurrent':
        # libvirt has no share policy for SPICE (sharePolicy is VNC only): the
        # SPICE server allows several clients when this is in its environment.
        env['SPICE_DEBUG_ALLOW_MC'] = '1'
    model = ET.SubElement(ET.SubElement(devices, 'video'), 'model', heads='1', primary='yes',
                          type=wire_name(specs_pb2.VideoModel, video.model) or 'cirrus')
    if video.HasField('memory'):
        model.set('vram', str(video.memory))
    return env


def _unix_channel(devices, path: str, name: str):
    # QEMU listens on the socket (mode bind); the node connects to it.
    channel = ET.SubElement(devices, 'channel', type='unix')
    ET.SubElement(channel, 'source', mode='bind', path=path)
    ET.SubElement(channel, 'target', type='virtio', name=name)


def _q35_controllers(devices, free_ports: int):
    """pcie-root, and root ports: one per device that may need one, plus free_ports.

    libvirt adds root ports for the devices it sees, but none spare, and a
    PCIe device can only be hot-plugged into an empty root port. The count
    errs high (legacy PCI NICs share one pcie-to-pci-bridge), which costs
    only a few unused ports."""
    pcie = 0
    for el in devices:
        if el.tag in ('interface', 'vsock') or (
                el.tag == 'controller' and el.get('type') == 'scsi'):
            pcie += 1
        elif el.tag == 'disk' and el.find('target').get('bus') == 'virtio':
            pcie += 1
    if any(el.tag == 'channel' and el.find('target').get('type') == 'virtio' for el in devices):
        pcie += 1                   # the virtio-serial controller
    pcie += 1                       # the USB controller (qemu-xhci)
    ET.SubElement(devices, 'controller', type='pci', index='0', model='pcie-root')
    for i in range(1, pcie + free_ports + 1):
        ET.SubElement(devices, 'controller', type='pci', index=str(i), model='pcie-root-port')
