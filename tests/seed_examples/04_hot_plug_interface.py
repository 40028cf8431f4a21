from shakenfist_client import apiclient

sf_client = apiclient.Client()

# Create a network to hot plug to
hotnet = sf_client.allocate_network('10.0.0.0/24', True, True, 'hotplug')

...

# Hot plug the interface in
netdesc = {
    'network_uuid': hotnet['uuid'],
    'address': '10.0.0.5',
    'macaddress': '02:00:00:ea:3a:28'
}
sf_client.add_instance_interface(inst['uuid'], netdesc)
