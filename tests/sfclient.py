"""Running the real sf-client 0.8.3 CLI (from .venv-sfclient) against a plane."""

import asyncio
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SF_CLIENT = ROOT / '.venv-sfclient' / 'bin' / 'sf-client'


class SfClient:
    def __init__(self, apiurl: str, namespace: str, key: str, home: pathlib.Path):
        self.env = {'PATH': os.environ['PATH'], 'HOME': str(home), 'SHAKENFIST_API_URL': apiurl,
                    'SHAKENFIST_NAMESPACE': namespace, 'SHAKENFIST_KEY': key,
                    'SHAKENFIST_ASYNC': 'pause'}

    async def run(self, *args, check=True, timeout=120):
        proc = await asyncio.create_subprocess_exec(
            str(SF_CLIENT), *args, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        out, err = out.decode(), err.decode()
        if check and proc.returncode != 0:
            raise AssertionError(f'sf-client {" ".join(args)} exited {proc.returncode}:\n{out}\n{err}')
        return proc.returncode, out, err

    async def json(self, *args):
        _, out, _ = await self.run('--json', *args)
        return json.loads(out)

    async def simple(self, *args):
        _, out, _ = await self.run('--simple', *args)
        return out
