"""The config drive's network_data.json says what DHCP says: address, MTU, DNS and
(with NAT) the default route, so cloud-init images work without DHCP too."""

import json

from sfnode import configdrive
from shakenfist.v1 import instance_pb2, network_pb2


def network_data(**network):
    net = network_pb2.Network(uuid='n1', netblock='198.18.30.0/24', **network)
    inst = instance_pb2.Instance(uuid='i1', name='web', interfaces=[network_pb2.NetworkInterface(
        uuid='f1', network_uuid='n1', macaddr='02:00:00:00:00:01', ipv4='198.18.30.7', order=0)])
    return json.loads(configdrive.contents(inst, {'n1': net})['openstack/latest/network_data.json'])


def test_a_served_nat_network_gives_the_mtu_dns_and_a_default_route_via_its_gateway():
    data = network_data(provide_dhcp=True, provide_nat=True)
    assert data['links'][0]['mtu'] == 1450
    assert data['networks'][0]['ip_address'] == '198.18.30.7'
    assert data['networks'][0]['netmask'] == '255.255.255.0'
    assert data['networks'][0]['routes'] == [{'network': '0.0.0.0', 'netmask': '0.0.0.0',
                                               'gateway': '198.18.30.1'}]
    assert data['services'] == [{'type': 'dns', 'address': '198.18.30.1'}]


def test_a_plain_network_has_no_route_and_no_dns():
    data = network_data()
    assert data['networks'][0]['routes'] == [] and data['services'] == []
