"""Domain XML built from a DesiredInstance (sfnode/domain.py), checked by parsing
it back and by defining it on libvirt's in-process test driver (test:///default).
No QEMU runs here: tests/test_sfnode_hypervisor.py boots real guests."""

import uuid
import xml.etree.ElementTree as ET

import pytest
import pytest_asyncio

from sfnode import domain
from sfnode.libvirt.hypervisor import Hypervisor
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_pb2 as ipb, network_pb2 as npb, specs_pb2 as spb

NET1, NET2 = str(uuid.uuid4()), str(uuid.uuid4())
BRIDGES = {NET1: 'br-net1', NET2: 'br-net2'}
QEMU = '{%s}' % domain.QEMU_NS


def make_instance(disks=(('virtio', 'disk'),), nics=(), video=('vga', 'vnc'),
                  channels=(ipb.SIDE_CHANNEL_SF_AGENT2,), machine=ipb.MACHINE_TYPE_PC,
                  configdrive=ipb.CONFIG_DRIVE_OPENSTACK_DISK) -> node_pb2.DesiredInstance:
    inst = ipb.Instance(uuid=str(uuid.uuid4()), name='web1', cpus=2, memory=256,
                        machine_type=machine, configdrive=configdrive,
                        side_channels=list(channels))
    for bus, kind in disks:
        inst.disk_spec.add(
            bus=spb.DiskBus.Value(f'DISK_BUS_{bus.upper()}') if bus else 0,
            type=spb.DISK_TYPE_CDROM if kind == 'cdrom' else spb.DISK_TYPE_DISK,
            **({} if kind == 'cdrom' else {'size': 8}))
    for order, (net, model) in enumerate(nics):
        inst.interfaces.add(uuid=str(uuid.uuid4()), network_uuid=net, order=order,
                            macaddr=f'02:00:00:00:00:{order + 1:02x}',
                            state=npb.NETWORK_INTERFACE_STATE_CREATED,
                            model=spb.NicModel.Value(f'NIC_MODEL_{model.upper()}') if model else 0)
    inst.video.model = spb.VideoModel.Value(f'VIDEO_MODEL_{video[0].upper()}')
    inst.video.memory = 16384
    inst.video.vdi = spb.VdiType.Value(f'VDI_TYPE_{video[1].upper()}')
    return node_pb2.DesiredInstance(instance=inst, desired_power_state=ipb.POWER_STATE_ON,
                                    vsock_cid=1234)


def build(desired, **options) -> tuple[str, ET.Element, domain.InstancePaths]:
    paths = domain.InstancePaths.under('/srv/sf/instances/x', desired.instance)
    options.setdefault('bridges', BRIDGES)
    xml = domain.build_domain_xml(desired, paths, domain.DomainOptions(**options))
    return xml, ET.fromstring(xml), paths


@pytest_asyncio.fixture
async def test_driver(tmp_path):
    async with Hypervisor(str(tmp_path), 'test:///default') as hv:
        yield hv


async def define_and_read_back(hv, xml) -> ET.Element:
    """Define on the test driver, return what it kept, and undefine."""
    info = await hv.define(xml)
    try:
        return ET.fromstring(await hv.domain_xml(info.uuid))
    finally:
        await hv.undefine(info.uuid)


# -- the full example of the brief ----------------------------------------------------------

@pytest.fixture
def example():
    return make_instance(disks=(('virtio', 'disk'), ('sata', 'cdrom')),
                         nics=((NET1, 'virtio'), (NET2, 'e1000')))


def test_domain_identity_machine_and_power_actions(example):
    _, root, _ = build(example)
    inst = example.instance
    assert root.tag == 'domain' and root.get('type') == 'qemu'
    assert root.findtext('name') == f'sf-{inst.uuid}'
    assert root.findtext('uuid') == inst.uuid
    assert root.find('memory').get('unit') == 'MiB' and root.findtext('memory') == '256'
    assert root.findtext('vcpu') == '2'
    ostype = root.find('os/type')
    assert (ostype.text, ostype.get('machine'), ostype.get('arch')) == ('hvm', 'pc', 'x86_64')
    assert root.find('features/acpi') is not None and root.find('features/apic') is not None
    assert root.find('cpu').get('mode') == 'maximum'         # TCG
    assert [root.findtext(t) for t in ('on_poweroff', 'on_reboot', 'on_crash')] == \
        ['destroy', 'restart', 'destroy']
    assert root.findtext('devices/emulator') == '/usr/bin/qemu-system-x86_64'
    assert root.find('devices/memballoon').get('model') == 'none'
    assert root.find(f'{QEMU}commandline') is None


def test_disks_boot_from_the_first_and_end_with_the_config_drive(example):
    _, root, paths = build(example)
    disks = root.findall('devices/disk')
    assert len(disks) == 3
    vda, cdrom, config = disks
    assert vda.get('device') == 'disk'
    assert vda.find('driver').get('type') == 'qcow2'
    assert vda.find('source').get('file') == paths.disks[0]
    assert vda.find('target').attrib == {'dev': 'vda', 'bus': 'virtio'}
    assert vda.find('boot').get('order') == '1'
    assert vda.find('readonly') is None

    assert cdrom.get('device') == 'cdrom'
    assert cdrom.find('target').attrib == {'dev': 'sda', 'bus': 'sata'}
    assert cdrom.find('driver').get('type') == 'raw'
    assert cdrom.find('readonly') is not None
    assert cdrom.find('boot') is None

    assert config.find('source').get('file') == paths.config_drive
    assert config.find('driver').get('type') == 'raw'
    assert config.find('target').attrib == {'dev': 'vdb', 'bus': 'virtio'}
    assert config.find('readonly') is not None


def test_nics_in_interface_order_on_their_networks_bridges(example):
    _, root, _ = build(example)
    nics = root.findall('devices/interface')
    assert [n.get('type') for n in nics] == ['bridge', 'bridge']
    assert [n.find('mac').get('address') for n in nics] == ['02:00:00:00:00:01', '02:00:00:00:00:02']
    assert [n.find('source').get('bridge') for n in nics] == ['br-net1', 'br-net2']
    assert [n.find('model').get('type') for n in nics] == ['virtio', 'e1000']
    taps = [n.find('target').get('dev') for n in nics]
    ifaces = example.instance.interfaces
    assert taps == [domain.tap_name(ifaces[0].uuid), domain.tap_name(ifaces[1].uuid)]
    assert all(t.startswith('tap-') and len(t) <= 15 for t in taps) and len(set(taps)) == 2


def test_one_serial_console_on_a_unix_socket_and_logged(example):
    """QEMU serves the serial port on a unix socket only the node can reach; the node
    shares it with the viewers it admits (sfnode/console.py). No TCP port of QEMU's."""
    _, root, paths = build(example)
    serials = root.findall('devices/serial')
    assert len(serials) == 1
    serial = serials[0]
    assert serial.get('type') == 'unix'
    assert serial.find('source').attrib == {'mode': 'bind', 'path': paths.console_socket}
    assert serial.find('log').attrib == {'file': paths.console_log, 'append': 'on'}
    console = root.find('devices/console')
    assert console.get('type') == 'unix'
    assert console.find('target').attrib == {'type': 'serial', 'port': '0'}
    assert console.find('source').get('path') == paths.console_socket


def test_graphical_consoles_have_the_instances_password_and_vnc_is_shared(example):
    _, root, _ = build(example, vdi_password='s3cret-pw')
    graphics = root.find('devices/graphics')
    assert graphics.get('passwd') == 's3cret-pw'
    assert graphics.get('sharePolicy') == 'force-shared'


def test_agent2_without_vsock_is_a_virtio_serial_port(example):
    _, root, paths = build(example)
    assert root.find('devices/vsock') is None
    channels = root.findall('devices/channel')
    assert len(channels) == 1
    assert channels[0].get('type') == 'unix'
    assert channels[0].find('source').attrib == {'mode': 'bind', 'path': paths.agent_socket}
    assert channels[0].find('target').attrib == {'type': 'virtio', 'name': 'sf-agent2'}


def test_vga_with_vnc_on_localhost(example):
    _, root, _ = build(example)
    model = root.find('devices/video/model')
    assert (model.get('type'), model.get('vram')) == ('vga', '16384')
    graphics = root.findall('devices/graphics')
    assert len(graphics) == 1
    assert graphics[0].get('type') == 'vnc'
    assert graphics[0].get('autoport') == 'yes'
    assert graphics[0].get('listen') == '127.0.0.1'
    assert graphics[0].find('listen').get('address') == '127.0.0.1'


async def test_example_defines_on_the_test_driver(example, test_driver):
    xml, _, paths = build(example)
    kept = await define_and_read_back(test_driver, xml)
    inst = example.instance
    assert kept.findtext('name') == f'sf-{inst.uuid}' and kept.findtext('uuid') == inst.uuid
    # (libvirt keeps disks sorted by bus and name)
    assert sorted(d.find('target').get('dev') for d in kept.findall('devices/disk')) == \
        ['sda', 'vda', 'vdb']
    assert [n.find('mac').get('address') for n in kept.findall('devices/interface')] == \
        ['02:00:00:00:00:01', '02:00:00:00:00:02']
    assert kept.find('devices/serial/log').get('file') == paths.console_log
    assert kept.find('devices/channel/target').get('name') == 'sf-agent2'
    assert kept.find('devices/video/model').get('type') == 'vga'
    assert kept.find('devices/graphics').get('type') == 'vnc'


# -- every bus, model and option ----------------------------------------------------------

@pytest.mark.parametrize('bus, device, libvirt_bus', [
    ('virtio', 'vda', 'virtio'), (None, 'vda', 'virtio'), ('sata', 'sda', 'sata'),
    ('scsi', 'sda', 'scsi'), ('usb', 'sda', 'usb')])
async def test_disk_bus_maps_to_libvirt_bus(bus, device, libvirt_bus, test_driver):
    xml, root, _ = build(make_instance(disks=((bus, 'disk'), (bus, 'disk'))))
    targets = [d.find('target').attrib for d in root.findall('devices/disk')]
    assert targets[0] == {'dev': device, 'bus': libvirt_bus}
    assert targets[1] == {'dev': device[:2] + 'b', 'bus': libvirt_bus}
    scsi = [c for c in root.findall('devices/controller') if c.get('type') == 'scsi']
    assert [c.get('model') for c in scsi] == (['virtio-scsi'] if bus == 'scsi' else [])
    # The config drive follows on the first disk's bus, read-only where libvirt allows it.
    config = root.findall('devices/disk')[-1]
    assert config.find('target').get('bus') == libvirt_bus
    assert (config.find('readonly') is not None) == (libvirt_bus != 'sata')
    await define_and_read_back(test_driver, xml)


async def test_nvme_disks_are_qemu_devices_and_the_first_boots(test_driver):
    xml, root, paths = build(make_instance(disks=(('nvme', 'disk'), ('virtio', 'disk'),
                                                  ('nvme', 'disk'))))
    args = [a.get('value') for a in root.findall(f'{QEMU}commandline/{QEMU}arg')]
    assert args[0::2] == ['-drive', '-device', '-drive', '-device']
    assert args[1].startswith(f'file={paths.disks[0]},format=qcow2,if=none,id=sfnvme0')
    assert args[3].startswith('nvme,drive=sfnvme0,serial=nvme0,') and args[3].endswith(',bootindex=1')
    assert args[5].startswith(f'file={paths.disks[2]},')
    assert 'bootindex' not in args[7] and 'serial=nvme1' in args[7]
    # The libvirt disks (vda, then the config drive vdb) boot after the NVMe one.
    disks = root.findall('devices/disk')
    assert [d.find('target').get('dev') for d in disks] == ['vda', 'vdb']
    assert disks[0].find('boot').get('order') == '2' and disks[1].find('boot') is None
    await define_and_read_back(test_driver, xml)
    slots = domain.disk_layout(make_instance(disks=(('nvme', 'disk'),)).instance,
                               domain.InstancePaths(['/x/d.qcow2'], None, '/x/c.log', '/x/c.sock', '/x/a.sock'))
    assert [(s.device, s.to_pb().bus) for s in slots] == [('nvme0', spb.DISK_BUS_NVME)]


@pytest.mark.parametrize('bus', ['virtio', None, 'nvme', 'sata', 'scsi', 'usb'])
def test_cdroms_are_read_only_and_never_on_virtio_or_nvme(bus):
    _, root, _ = build(make_instance(disks=(('virtio', 'disk'), (bus, 'cdrom'))))
    cdrom = root.findall('devices/disk')[1]
    assert cdrom.get('device') == 'cdrom'
    assert cdrom.find('target').get('bus') == (bus if bus in ('scsi', 'usb', 'sata') else 'sata')
    assert cdrom.find('readonly') is not None


def test_ide_is_refused():
    with pytest.raises(domain.UnsupportedSpec):
        build(make_instance(disks=(('ide', 'disk'),)))


@pytest.mark.parametrize('model', [v.name for v in spb.NicModel.DESCRIPTOR.values])
async def test_every_nic_model_maps_to_its_wire_name(model, test_driver):
    value = spb.NicModel.Value(model)
    wire = domain.wire_name(spb.NicModel, value) or 'virtio'
    assert wire in ('virtio', 'e1000', 'rtl8139', 'ne2k_pci', 'pcnet', 'i82551', 'i82557b', 'i82559er')
    desired = make_instance(nics=((NET1, None),))
    desired.instance.interfaces[0].model = value
    xml, root, _ = build(desired)
    assert root.find('devices/interface/model').get('type') == wire
    kept = await define_and_read_back(test_driver, xml)
    assert kept.find('devices/interface/model').get('type') == wire


def test_deleted_interfaces_are_left_out_and_order_is_respected():
    desired = make_instance(nics=((NET1, 'virtio'), (NET2, 'virtio'), (NET1, 'virtio')))
    ifaces = desired.instance.interfaces
    ifaces[0].order, ifaces[2].order = 2, 0
    ifaces[1].state = npb.NETWORK_INTERFACE_STATE_DELETED
    _, root, _ = build(desired)
    assert [n.find('mac').get('address') for n in root.findall('devices/interface')] == \
        [ifaces[2].macaddr, ifaces[0].macaddr]


def test_a_network_without_a_bridge_is_an_error():
    with pytest.raises(ValueError, match='no bridge'):
        build(make_instance(nics=((NET1, 'virtio'),)), bridges={})


def test_vsock_when_the_host_has_it():
    _, root, _ = build(make_instance(), vsock=True)
    vsock = root.find('devices/vsock')
    assert vsock.get('model') == 'virtio'
    assert vsock.find('cid').attrib == {'auto': 'no', 'address': '1234'}
    assert root.find('devices/channel') is None


def test_legacy_agent_channel():
    _, root, paths = build(make_instance(channels=(ipb.SIDE_CHANNEL_SF_AGENT,)))
    channels = root.findall('devices/channel')
    assert [(c.find('target').get('name'), c.find('source').get('path')) for c in channels] == \
        [('sf-agent', paths.legacy_agent_socket)]


def test_no_side_channels_no_config_drive():
    _, root, _ = build(make_instance(channels=(), configdrive=ipb.CONFIG_DRIVE_NONE))
    assert root.find('devices/channel') is None and root.find('devices/vsock') is None
    assert len(root.findall('devices/disk')) == 1


@pytest.mark.parametrize('model', ['vga', 'cirrus', 'qxl'])
@pytest.mark.parametrize('vdi', ['vnc', 'spice', 'spiceconcurrent'])
async def test_video_and_vdi(model, vdi, test_driver):
    xml, root, _ = build(make_instance(video=(model, vdi)), vdi_listen='0.0.0.0')
    assert root.find('devices/video/model').attrib['type'] == model
    graphics = root.find('devices/graphics')
    assert graphics.get('type') == ('vnc' if vdi == 'vnc' else 'spice')
    assert graphics.get('listen') == '0.0.0.0'
    env = {e.get('name'): e.get('value') for e in root.findall(f'{QEMU}commandline/{QEMU}env')}
    assert env == ({'SPICE_DEBUG_ALLOW_MC': '1'} if vdi == 'spiceconcurrent' else {})
    await define_and_read_back(test_driver, xml)


def test_fixed_vdi_port():
    _, root, _ = build(make_instance(), vdi_port=5977)
    graphics = root.find('devices/graphics')
    assert (graphics.get('port'), graphics.get('autoport')) == ('5977', 'no')


async def test_q35_has_free_root_ports_for_hotplug(test_driver):
    desired = make_instance(machine=ipb.MACHINE_TYPE_Q35, nics=((NET1, 'virtio'),))
    xml, root, _ = build(desired)
    assert root.find('os/type').get('machine') == 'q35'
    models = [c.get('model') for c in root.findall('devices/controller') if c.get('type') == 'pci']
    assert models[0] == 'pcie-root'
    # vda, config drive, NIC, virtio-serial, USB: 5 that may take a port, plus spares.
    assert models.count('pcie-root-port') == 5 + domain.Q35_HOTPLUG_PORTS
    await define_and_read_back(test_driver, xml)


def test_kvm_domains_get_the_host_cpu():
    _, root, _ = build(make_instance(), domain_type='kvm')
    assert root.get('type') == 'kvm'
    assert root.find('cpu').get('mode') == 'host-passthrough'


def ovmf(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_bytes(b'')
    return str(tmp_path)


def test_uefi_boots_ovmf_with_an_nvram_of_the_instance_own(tmp_path):
    desired = make_instance()
    desired.instance.uefi = True
    _, root, paths = build(desired, ovmf_dir=ovmf(tmp_path, *domain.OVMF_PLAIN))
    loader, nvram = root.find('os/loader'), root.find('os/nvram')
    assert (loader.text, loader.get('readonly'), loader.get('type'), loader.get('secure')) == (
        f'{tmp_path}/OVMF_CODE_4M.fd', 'yes', 'pflash', 'no')
    assert (nvram.text, nvram.get('template')) == (paths.nvram, f'{tmp_path}/OVMF_VARS_4M.fd')
    assert paths.nvram == '/srv/sf/instances/x/nvram.fd' and root.find('features/smm') is None


def test_secure_boot_takes_the_secboot_firmware_microsoft_keys_and_smm_on_q35(tmp_path):
    desired = make_instance()
    desired.instance.uefi = desired.instance.secure_boot = True
    desired.instance.machine_type = ipb.MACHINE_TYPE_Q35
    _, root, _ = build(desired, ovmf_dir=ovmf(tmp_path, *domain.OVMF_SECURE))
    assert root.find('os/loader').text.endswith('OVMF_CODE_4M.secboot.fd')
    assert root.find('os/loader').get('secure') == 'yes'
    assert root.find('os/nvram').get('template').endswith('OVMF_VARS_4M.ms.fd')
    assert root.find('features/smm').get('state') == 'on' and root.find('os/type').get('machine') == 'q35'


@pytest.mark.parametrize('case', ['no firmware', 'secure boot on pc', 'an nvram template'])
def test_uefi_that_cannot_be_done_right_is_refused_rather_than_booted_otherwise(tmp_path, case):
    desired = make_instance()
    desired.instance.uefi = True
    files = domain.OVMF_SECURE + domain.OVMF_PLAIN
    if case == 'no firmware':
        files = ()
    elif case == 'secure boot on pc':
        desired.instance.secure_boot = True
    else:
        desired.instance.nvram_template = 'a-blob-uuid'
    with pytest.raises(domain.UnsupportedSpec):
        build(desired, ovmf_dir=ovmf(tmp_path, *files))


def test_an_nvram_template_of_the_instance_replaces_ovmfs(tmp_path):
    desired = make_instance()
    desired.instance.uefi = True
    desired.instance.nvram_template = 'a-blob-uuid'
    _, root, _ = build(desired, ovmf_dir=ovmf(tmp_path, *domain.OVMF_PLAIN), nvram_template='/cache/vars.fd')
    assert root.find('os/nvram').get('template') == '/cache/vars.fd'


def test_values_are_escaped_not_formatted():
    desired = make_instance()
    desired.instance.name = 'a<b & "c"'
    xml, root, _ = build(desired)
    assert root.findtext('title') == 'a<b & "c"'
    assert '&lt;' in xml


def test_disk_layout_reports_disks():
    desired = make_instance(disks=(('virtio', 'disk'), ('sata', 'cdrom'), ('scsi', 'disk')))
    paths = domain.InstancePaths.under('/x', desired.instance)
    slots = domain.disk_layout(desired.instance, paths)
    assert [(s.device, s.bus, s.present_as) for s in slots] == [
        ('vda', 'virtio', 'disk'), ('sda', 'sata', 'cdrom'), ('sdb', 'scsi', 'disk'),
        ('vdb', 'virtio', 'disk')]
    reported = [s.to_pb() for s in slots]
    assert [(d.device, d.bus) for d in reported] == [
        ('vda', spb.DISK_BUS_VIRTIO), ('sda', spb.DISK_BUS_SATA), ('sdb', spb.DISK_BUS_SCSI),
        ('vdb', spb.DISK_BUS_VIRTIO)]
    assert [d.snapshot_ignores for d in reported] == [False, True, False, True]
    assert reported[0].size == 8 and not reported[1].HasField('size')
    assert domain._device_letters(25) == 'z' and domain._device_letters(26) == 'aa'


# -- hot-plug -----------------------------------------------------------------------------------

def test_hotplug_interface_xml():
    iface = npb.NetworkInterface(uuid=str(uuid.uuid4()), network_uuid=NET2, macaddr='02:00:00:ab:cd:ef',
                                 model=spb.NIC_MODEL_RTL8139, order=3)
    el = ET.fromstring(domain.interface_xml(iface, 'br-net2'))
    assert el.tag == 'interface' and el.get('type') == 'bridge'
    assert el.find('mac').get('address') == '02:00:00:ab:cd:ef'
    assert el.find('source').get('bridge') == 'br-net2'
    assert el.find('model').get('type') == 'rtl8139'
    assert el.find('target').get('dev') == domain.tap_name(iface.uuid)


def test_a_vtpm_is_an_emulated_tpm2_crb_device(tmp_path):
    desired = make_instance()
    desired.instance.uefi = desired.instance.vtpm = True
    _, root, _ = build(desired, ovmf_dir=ovmf(tmp_path, *domain.OVMF_PLAIN))
    tpm = root.find('devices/tpm')
    assert tpm.get('model') == 'tpm-crb'
    assert (tpm.find('backend').get('type'), tpm.find('backend').get('version')) == ('emulator', '2.0')
    _, plain, _ = build(make_instance())
    assert plain.find('devices/tpm') is None
