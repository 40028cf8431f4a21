"""sf-up: two planes side by side, their endpoint files, and a clean stop."""

import json
import os
import stat
import subprocess
import urllib.request

from shakenfist.v1 import instance_service_pb2 as api
from tests.plane import Plane


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
