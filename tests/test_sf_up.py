"""sf-up: two planes side by side, their endpoint files, and a clean stop; etcd
killed under it is started again (a node killed under it: tests/test_e2e_nodes.py)."""

import json
import os
import stat
import subprocess
import urllib.request

from shakenfist.v1 import instance_service_pb2 as api
from tests.plane import Plane, _children, _cmdline
from tests.waiting import eventually


def test_two_planes_run_side_by_side_and_stop_cleanly():
    a, b = Plane(nodes=0), Plane(nodes=0)
    a.start()
    try:
        b.start()
        try:
            for p in (a, b):
                endpoints = json.loads((p.state / 'endpoints.json').read_text())
                assert set(endpoints) == {'grpc', 'rest', 'node_api', 'metrics', 'namespace', 'key'}
                assert endpoints['namespace'] == 'system'
                config = json.loads((p.state / 'shakenfist.json').read_text())
                assert config == {'namespace': 'system', 'key': endpoints['key'], 'apiurl': endpoints['rest']}
                assert stat.S_IMODE(os.stat(p.state / 'shakenfist.json').st_mode) == 0o600
            assert a.endpoints['grpc'] != b.endpoints['grpc'] and a.endpoints['key'] != b.endpoints['key']
            etcd_b = subprocess.run(['pgrep', '-f', f'etcd --name sf --data-dir {b.state}'],
                                    capture_output=True, text=True).stdout.split()
            assert len(etcd_b) == 1
        finally:
            b.stop()
        # b's etcd is gone; a still serves.
        assert not subprocess.run(['pgrep', '-f', f'--data-dir {b.state}'], capture_output=True).stdout
        import asyncio

        async def listed():
            c = await a.client()
            try:
                return (await c.instances.ListInstances(api.ListInstancesRequest())).instances
            finally:
                await c.close()
        assert asyncio.run(listed()) == []
        sf = a.sf()
        out = asyncio.run(sf.json('instance', 'list'))
        assert out == {'instances': []}
        # Both parts' /metrics answer, and count what was just done.
        for part, url in a.endpoints['metrics'].items():
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            assert r.status == 200
            expect = ('grpc_server_handled_total{grpc_code="OK",grpc_method="ListInstances"'
                      if part == 'controller' else 'sf_gateway_requests_total{')
            assert expect in text, (part, text[:500])
    finally:
        a.stop()


async def test_etcd_killed_under_sf_up_is_started_again_and_the_plane_serves():
    p = Plane(nodes=0).start()
    try:
        def etcd_pids():
            return [pid for pid in _children(p.proc.pid) if _cmdline(pid).startswith('/usr/bin/etcd')]
        [first] = etcd_pids()
        os.kill(first, 9)
        await eventually(lambda: 'etcd killed by SIGKILL; restarting it in' in p.log_text(), 30, interval=0.1,
                         what='sf-up restarting etcd')
        await eventually(lambda: [pid for pid in etcd_pids() if pid != first], 60, interval=0.2,
                         what='a new etcd')
        c = await p.client()
        try:
            async def listed():
                try:
                    return (await c.instances.ListInstances(api.ListInstancesRequest())).instances == []
                except Exception:       # noqa: BLE001 -- the controller reconnecting to etcd
                    return False
            await eventually(listed, 60, interval=0.5, what='the plane serves again')
        finally:
            await c.close()
        assert p.proc.poll() is None
    finally:
        p.stop()
