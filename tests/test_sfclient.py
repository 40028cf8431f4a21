"""The real sf-client 0.8.3 CLI against the gateway, asserting on its parsed output."""


from tests.helpers import get


async def test_network_create_show_list(sf):
    n = await sf.json('network', 'create', 'net1', '10.0.0.0/24')
    assert n['name'] == 'net1' and n['netblock'] == '10.0.0.0/24' and n['state'] == 'created'
    assert n['metadata'] == {}
    shown = await sf.json('network', 'show', 'net1')
    assert shown['uuid'] == n['uuid']
    out = await sf.simple('network', 'list')
    assert n['uuid'] in out and 'net1' in out


async def create(sf, *args):
    return await sf.json('instance', 'create', *args)


async def test_instance_create_with_disks_networks_video_metadata_and_side_channels(sf, system):
    await sf.json('network', 'create', 'net1', '10.0.0.0/24')
    a = await create(sf, 'inst1', '1', '1024', '-d', '8@sftest', '-n', 'net1',
                     '-I', 'ssh-ed25519 AAAAC3Nz test', '-m', 'tags=["ci"]')
    assert a['state'] == 'created' and a['name'] == 'inst1'
    assert a['disk_spec'] == [{'base': 'sftest', 'bus': None, 'size': 8, 'type': 'disk'}]
    assert a['ssh_key'].startswith('ssh-ed25519') and a['side_channels'] == ['sf-agent', 'sf-agent2']
    assert a['metadata'] == {'tags': ['ci']}
    (iface,) = a['network_interfaces']
    assert iface['ipv4'].startswith('10.0.0.') and iface['order'] == 0

    b = await create(sf, 'inst2', '2', '2048', '-D', 'size=10,base=sftest,bus=sata',
                     '-f', 'net1', '-N', 'network_uuid=net1,address=none,model=e1000',
                     '-V', 'model=qxl,memory=65536,vdi=vnc', '--side-channel', 'sf-agent2',
                     '-U', 'I2Nsb3VkLWNvbmZpZwo=')
    assert b['disk_spec'][0]['bus'] == 'sata' and b['disk_spec'][0]['size'] == 10
    assert b['video'] == {'model': 'qxl', 'memory': 65536, 'vdi': 'vnc'}
    assert b['side_channels'] == ['sf-agent2'] and b['user_data'] == 'I2Nsb3VkLWNvbmZpZwo='
    floated, plain = sorted(b['network_interfaces'], key=lambda i: i['order'])
    assert floated['floating'] and plain['ipv4'] is None and plain['model'] == 'e1000'

    c = await create(sf, 'inst3', '1', '256', '-d', '1', '--no-side-channels')
    assert c['side_channels'] == [] and c['disk_spec'][0]['base'] is None


async def test_create_errors_are_reported_clearly(sf):
    rc, out, err = await sf.run('instance', 'create', 'bad.name', '1', '256', '-d', '1', check=False)
    assert rc == 1 and 'Malformed Request' in out + err and 'hostname' in out + err
    rc, out, err = await sf.run('instance', 'create', 'x', '1', '256', '-D', 'size=1,bus=ide',
                                check=False)
    assert rc == 1 and 'ide' in out + err and 'Traceback' not in out + err


async def test_list_and_show_in_simple_and_json(sf):
    await sf.json('network', 'create', 'net1', '10.0.0.0/24')
    inst = await create(sf, 'inst1', '1', '1024', '-d', '8@sftest', '-n', 'net1')
    listed = await sf.json('instance', 'list')
    assert [i['uuid'] for i in listed['instances']] == [inst['uuid']]
    simple = await sf.simple('instance', 'list')
    header, row = simple.strip().splitlines()[:2]
    assert header.startswith('uuid,name,namespace,cpus,memory,hypervisor,power state,state')
    assert row.startswith(f"{inst['uuid']},inst1,system,1,1024,node1,on,created")
    shown = await sf.simple('instance', 'show', 'inst1')
    assert f"uuid:{inst['uuid']}" in shown and 'disk_spec,type,bus,size,base' in shown
    assert 'disk_spec,disk,None,8,sftest' in shown and 'iface,' in shown
    full = await sf.json('instance', 'show', '-a', 'inst1')
    assert full['power_state'] == 'on' and full['agent_operations'] == []
    assert await sf.json('instance', 'list', '-a')


async def test_events_with_type_and_limit(sf):
    await create(sf, 'inst1', '1', '256', '-d', '1')
    events = await sf.json('instance', 'events', 'inst1')
    assert events and {'timestamp', 'fqdn', 'message', 'type', 'duration', 'extra'} <= set(events[0])
    assert events[0]['timestamp'] >= events[-1]['timestamp']
    audit = await sf.json('instance', 'events', '-t', 'audit', '-l', '1', 'inst1')
    assert len(audit) == 1 and audit[0]['type'] == 'audit'
    rc, out, err = await sf.run('instance', 'events', '-t', 'nonsense', 'inst1', check=False)
    assert rc == 1 and 'Malformed Request' in out + err


async def test_metadata_set_and_delete(sf, system):
    inst = await create(sf, 'inst1', '1', '256', '-d', '1')
    await sf.run('instance', 'set-metadata', 'inst1', 'foo', 'bar')
    assert (await get(system, inst['uuid'])).metadata['foo'] == 'bar'
    assert await sf.json('instance', 'delete-metadata', 'inst1', 'foo') == {}
    assert 'foo' not in (await get(system, inst['uuid'])).metadata


async def test_power_pause_and_reboot(sf, node):
    await create(sf, 'inst1', '1', '256', '-d', '1')
    for command, power in (('poweroff', 'off'), ('poweron', 'on'), ('pause', 'paused'),
                           ('unpause', 'on')):
        assert await sf.json('instance', command, 'inst1') == {}
        shown = await sf.json('instance', 'show', 'inst1')
        assert shown['power_state'] in (power, f'transition-to-{power}' if power != 'paused'
                                        else 'transition-to-paused')
    await sf.json('instance', 'reboot', 'inst1')
    await sf.json('instance', 'reboot', '--hard', 'inst1')
    assert [r.hard for name, r in node.calls if name == 'RebootInstance'] == [False, True]


async def test_consoledata_and_consoledelete(sf, node):
    await create(sf, 'inst1', '1', '256', '-d', '1')
    node.console = b'boot log line one\nboot log line two\n'
    _, out, _ = await sf.run('instance', 'consoledata', 'inst1', '9')
    assert out == 'line two\n'
    _, out, _ = await sf.run('instance', 'consoledata', 'inst1', '--', '-1')
    assert out == node.console.decode()
    await sf.run('instance', 'consoledelete', 'inst1')
    assert node.console == b''


async def test_vdiconsolefile_direct(sf):
    await create(sf, 'inst1', '1', '256', '-d', '1', '-V', 'model=vga,memory=16384,vdi=vnc')
    _, out, _ = await sf.run('instance', 'vdiconsolefile', '--direct', 'inst1')
    assert '[virt-viewer]' in out and 'type=vnc' in out and 'port=31001' in out


async def test_add_interface_and_interface_float_defloat(sf):
    await sf.json('network', 'create', 'net1', '10.0.0.0/24')
    inst = await create(sf, 'inst1', '1', '256', '-d', '1', '-n', 'net1')
    await sf.run('instance', 'add-interface', 'inst1', '-f', 'net1@10.0.0.77')
    shown = await sf.json('instance', 'show', 'inst1')
    added = [i for i in shown['network_interfaces'] if i['ipv4'] == '10.0.0.77']
    assert len(added) == 1 and added[0]['order'] == 1
    other = [i for i in shown['network_interfaces'] if i['order'] == 0][0]

    async def show():
        (iface,) = (await sf.json('interface', 'show', other['uuid']))['network_interfaces']
        assert iface['uuid'] == other['uuid']
        return iface
    assert (await show())['floating'] is None
    assert await sf.json('interface', 'float', other['uuid']) == {}
    assert (await show())['floating'].startswith('198.51.100.')
    await sf.json('interface', 'defloat', other['uuid'])
    assert (await show())['floating'] is None
    _, out, _ = await sf.run('network', 'instances', 'net1')
    assert inst['uuid'] in out and '10.0.0.77' in out and other['ipv4'] in out


async def test_delete_and_delete_all(sf, system):
    a = await create(sf, 'a', '1', '256', '-d', '1')
    await create(sf, 'b', '1', '256', '-d', '1')
    await create(sf, 'c', '1', '256', '-d', '1')
    deleted = await sf.json('instance', 'delete', 'a')
    assert deleted['state'] == 'deleted' and deleted['uuid'] == a['uuid']
    await sf.run('instance', 'delete-all', '--confirm', '--namespace', 'system')
    listed = await sf.json('instance', 'list')
    assert listed['instances'] == []


async def test_not_found_and_bad_key(sf):
    rc, out, err = await sf.run('--json', 'instance', 'show', 'doesnotexist', check=False)
    assert rc == 1 and 'Resource not found: instance not found' in out + err
    sf.env['SHAKENFIST_KEY'] = 'wrong'
    rc, out, err = await sf.run('instance', 'list', check=False)
    assert rc == 1 and 'Not authenticated' in out + err


async def test_namespace_create_and_add_key(sf, controller):
    await sf.run('namespace', 'create', 'team')
    await sf.run('namespace', 'add-key', 'team', 'k1', 'secret1')
    shown = await sf.json('namespace', 'show', 'team')
    assert shown['name'] == 'team' and shown['keys'] == ['k1']
    sf.env.update(SHAKENFIST_NAMESPACE='team', SHAKENFIST_KEY='secret1')
    assert (await sf.json('instance', 'list'))['instances'] == []
