"""The KVM probe's guest: a tiny BIOS disk under KVM, to see whether KVM works here."""

import xml.etree.ElementTree as ET




def xml_name(xml: str) -> str:
    try:
        return ET.fromstring(xml).findtext('name') or ''
    except ET.ParseError:
        return ''


def probe_xml(name: str, image: str, log_path: str, emulator: str) -> str:
    dom = ET.Element('domain', type='kvm')
    ET.SubElement(dom, 'name').text = name
    ET.SubElement(dom, 'memory', unit='MiB').text = '128'
    ET.SubElement(dom, 'vcpu').text = '1'
    os_el = ET.SubElement(dom, 'os')
    ET.SubElement(os_el, 'type', arch='x86_64', machine='pc').text = 'hvm'
    ET.SubElement(os_el, 'boot', dev='hd')
    features = ET.SubElement(dom, 'features')
    ET.SubElement(features, 'acpi')
    ET.SubElement(features, 'apic')
    # The CPU real guests will get: host-passthrough is what fails on some hosts.
    ET.SubElement(dom, 'cpu', mode='host-passthrough')
    ET.SubElement(dom, 'on_crash').text = 'destroy'
    devices = ET.SubElement(dom, 'devices')
    ET.SubElement(devices, 'emulator').text = emulator
    disk = ET.SubElement(devices, 'disk', type='file', device='disk')
    fmt = 'qcow2' if image.endswith('.qcow2') else 'raw'
    ET.SubElement(disk, 'driver', name='qemu', type=fmt)
    ET.SubElement(disk, 'source', file=image)
    ET.SubElement(disk, 'target', dev='vda', bus='virtio')
    ET.SubElement(disk, 'readonly')       # the image is shared: never written
    serial = ET.SubElement(devices, 'serial', type='file')
    ET.SubElement(serial, 'source', path=log_path)
    ET.SubElement(serial, 'target', port='0')
    ET.SubElement(devices, 'memballoon', model='none')
    return ET.tostring(dom, encoding='unicode')
