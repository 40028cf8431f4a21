"""Usage statistics in the shape of Shaken Fist's usage events."""


import libvirt



def usage_event(dom, cpu, disks, interfaces) -> dict:
    """Statistics in the shape of Shaken Fist's usage events (the seed shows one)."""
    try:
        times = dom.getCPUStats(True)[0]
    except libvirt.libvirtError:
        times = {}
    out = {'cpu usage': {'cpu time ns': cpu['cpu_time_ns'],
                         'system time ns': times.get('system_time', 0),
                         'user time ns': times.get('user_time', 0)},
           'disk usage': {}, 'network usage': {}}
    for dev, d in disks.items():
        try:
            actual = dom.blockInfo(dev)[1]
        except libvirt.libvirtError:
            actual = 0
        out['disk usage'][dev] = {'actual bytes on disk': actual, 'errors': d['errs'],
                                  'read bytes': d['rd_bytes'], 'read requests': d['rd_req'],
                                  'write bytes': d['wr_bytes'], 'write requests': d['wr_req']}
    for mac, n in interfaces.items():
        out['network usage'][mac] = {
            'read bytes': n['rx_bytes'], 'read drops': n['rx_drop'], 'read errors': n['rx_errs'],
            'read packets': n['rx_packets'], 'write bytes': n['tx_bytes'],
            'write drops': n['tx_drop'], 'write errors': n['tx_errs'], 'write packets': n['tx_packets']}
    return out

