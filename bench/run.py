"""Run the benchmarks and print the results table (bench/README.md explains them).

    python bench/run.py [--quick] [--only P1,P3] [--out results.md]

Every figure is a ratio against a baseline measured in the same run, or (P4, P6,
P8) an absolute figure whose goal is absolute. Each is measured in several rounds;
the table gives the median of the rounds and their min-max.
"""

import argparse
import asyncio
import datetime
import logging
import os
import pathlib
import platform
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import create, guest, latency, network, throughput  # noqa: E402
from bench.common import ROOT, Plane, p50, spread  # noqa: E402

MS = 1000


def row(measure, baseline, values, goal, met, unit=''):
    return dict(measure=measure, baseline=baseline, median=f'{p50(values):.2f}{unit}',
                spread=spread(values) + unit, goal=goal, met='yes' if met(p50(values)) else 'NO')


def ms(values):
    return [v * MS for v in values]


async def on_plane(bench, *args):
    """Run bench(plane, *args) on a fresh etcd; stop whatever it started."""
    plane = Plane()
    try:
        return await bench(plane, *args)
    finally:
        plane.stop()


async def run(only, quick, explicit_rounds=None):
    rounds = explicit_rounds or (2 if quick else 5)
    rows, notes = [], []

    def want(*names):
        return any(n in only for n in names)

    def note(text):
        notes.append(text)
        print(text, flush=True)

    if want('P1', 'P2'):
        r = await on_plane(latency.p1_p2, rounds, 100 if quick else 2000)
        note(f"P1/P2 p50 per round (ms): gRPC echo {fmt(ms(r['echo']))}, GetInstance {fmt(ms(r['grpc']))}, "
             f"REST through the gateway {fmt(ms(r['rest']))}, aiohttp echo of the same body "
             f"{fmt(ms(r['http_echo']))}")
        rows.append(row('P1 gRPC GetInstance p50', 'bare grpc.aio echo p50', r['P1'], '<= 1.5x',
                        lambda v: v <= 1.5, 'x'))
        rows.append(row('P2 REST GET /instances/{uuid} p50 (gateway)', 'gRPC GetInstance p50', r['P2'],
                        '<= 1.5x', lambda v: v <= 1.5, 'x'))
    if want('P3'):
        r = await on_plane(throughput.p3, rounds, 1.0 if quick else 4.0)
        note(f"P3 per round: etcd commits/s {fmt(r['commits'], 0)}, creates/s {fmt(r['creates'], 0)}, "
             f"failed creates {r['failed']}, conflict retries per create {fmt(r['retries'])}")
        rows.append(row('P3 acknowledged creates/s, 16 gRPC clients', 'sequential Store.commit/s, 1 client',
                        r['P3'], '>= 0.5x', lambda v: v >= 0.5, 'x'))
    if want('P4'):
        r = await on_plane(create.p4, rounds, 3 if quick else 10)
        note(f"P4 per round (ms): create->created via sfnode {fmt(ms(r['created']))}, libvirt define+start "
             f"{fmt(ms(r['define']))}; node disk prep (qemu-img info+create, genisoimage) "
             f"{fmt(ms(r['prep']))}; via node double {fmt(ms(r['double']))}")
        note('Store requests per create, call to created, node double: ' +
             ', '.join(f'{kind} {count:.1f}' for kind, count in sorted(r['requests_per_create'].items())))
        note('P4 via sfnode, when the controller sees each state after the call: ' +
             ', '.join(f'{label} {text}' for label, text in r['stages'].items()))
        rows.append(row('P4 create->created minus libvirt define+start (sfnode, test:///default)',
                        '-', ms(r['P4']), 'p50 <= 50 ms', lambda v: v <= 50, ' ms'))
        rows.append(row('P4b the same minus node disk prep (subprocesses)', '-', ms(r['P4b']),
                        'p50 <= 50 ms', lambda v: v <= 50, ' ms'))
        rows.append(row('P4c create->created with the node double', '-', ms(r['double']),
                        'p50 <= 50 ms', lambda v: v <= 50, ' ms'))
    if want('P5') and (why := guest.unavailable()):
        note(f'P5 skipped: {why}')
    elif want('P5'):
        r = await guest.p5(explicit_rounds or (1 if quick else rounds))     # a boot is 10-20 s
        note(f"P5 per round (s): through the plane {fmt(r['plane'])}, bare libvirt {fmt(r['bare'])}; "
             f"the guest's boot (domain started to its agent's console line) {fmt(r['boot'])}; added by the "
             f"plane, boot excluded {fmt(r['added'])}")
        rows.append(row('P5 real guest: create -> agent ready', 'bare define+start -> first agent reply',
                        r['P5'], '<= 1.3x', lambda v: v <= 1.3, 'x'))
        rows.append(row("P5' the same, boot-time noise removed (1 + plane's added time / bare)",
                        'bare define+start -> first agent reply', r["P5'"], '<= 1.3x', lambda v: v <= 1.3, 'x'))
    if want('P6'):
        r = await on_plane(create.p6, rounds, 2.0 if quick else 10.0)
        note(f"P6 instances per node: {r['placed']}; etcd requests in all windows, by kind: {r['kinds']}")
        rows.append(row('P6 etcd requests/s at idle, 100 instances on 3 nodes (lease keepalives apart)', '-', r['P6'], '0',
                        lambda v: v == 0, '/s'))
    if want('P7'):
        r = await on_plane(latency.p7, rounds, 50 if quick else 500)
        note(f"P7 p50 per round (ms): 100 stored {fmt(ms(r['small']))}, 10,000 stored {fmt(ms(r['large']))}")
        rows.append(row('P7 ListInstances page of 100, 10,000 stored', 'the same with 100 stored',
                        r['P7'], '<= 1.5', lambda v: v <= 1.5, 'x'))
    if want('P8'):
        r = await on_plane(latency.p8, rounds, 50 if quick else 300)
        note(f"P8 p50 per round (ms): from the etcd commit's reply {fmt(ms(r['commit']))}, from its "
             f"request {fmt(ms(r['commit_sent']))}, from SetInstanceMetadata's return {fmt(ms(r['api']))}")
        rows.append(row("P8 WatchEvents delivery p50, from the etcd commit's reply", '-', ms(r['commit']),
                        '<= 5 ms', lambda v: v <= 5, ' ms'))
        rows.append(row("P8a the same, from the commit's request (upper bound)", '-', ms(r['commit_sent']),
                        '<= 5 ms', lambda v: v <= 5, ' ms'))
        rows.append(row("P8b the same, from the mutating call's return", '-', ms(r['api']),
                        '<= 5 ms', lambda v: v <= 5, ' ms'))
    if want('P9') and (why := guest.unavailable()):
        note(f'P9 skipped: {why}')
    elif want('P9'):
        r = await network.p9(rounds)
        note(f"P9 per round (s): create -> ping answered {fmt(r['ping'])}, create -> the guest configured "
             f"its address {fmt(r['boot'])}; float -> reached {fmt(ms(r['float']), 0)} ms, defloat -> "
             f"unreachable {fmt(ms(r['defloat']), 0)} ms")
        rows.append(row('P9 real guest on a DHCP network across the mesh: create -> answers a ping',
                        "create -> the guest's console says it has the address", r['P9'], '-',
                        lambda v: True, 'x'))
        rows.append(row('P9b float -> the outside reaches the guest through the floating address', '-',
                        ms(r['float']), '< 1000 ms', lambda v: v < 1000, ' ms'))
        rows.append(row('P9c defloat -> no longer reached (includes up to one 300 ms probe)', '-',
                        ms(r['defloat']), '< 1000 ms', lambda v: v < 1000, ' ms'))
    return rows, notes


def machine() -> str:
    load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
    tree = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or 'unknown'
    return (f'{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Python '
            f'{platform.python_version()}, load average at the end {load}; tree {tree}')


def fmt(values, digits=2):
    return '[' + ', '.join(f'{v:.{digits}f}' for v in values) + ']'


def table(rows) -> str:
    head = '| measure | baseline (same run) | median | spread (min-max) | goal | met? |'
    lines = [head, '|---|---|---|---|---|---|']
    lines += [f"| {r['measure']} | {r['baseline']} | {r['median']} | {r['spread']} | {r['goal']} | {r['met']} |"
              for r in rows]
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='a smoke run: 2 rounds of few iterations')
    p.add_argument('--only', default='P1,P2,P3,P4,P5,P6,P7,P8,P9', help='comma-separated measures')
    p.add_argument('--rounds', type=int, help='rounds per measure (default 5; 2 with --quick)')
    p.add_argument('--out', type=pathlib.Path, help='also write the table and notes here (markdown)')
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    only = {x.strip().upper() for x in args.only.split(',')}
    started = datetime.datetime.now(datetime.timezone.utc)
    rows, notes = asyncio.run(run(only, args.quick, args.rounds))
    text = (f"{'Quick run' if args.quick else 'Run'} of {started:%Y-%m-%d %H:%M} UTC on {machine()}\n\n"
            f"{table(rows)}\n\n" + '\n'.join(f'- {n}' for n in notes) + '\n')
    print('\n' + text)
    if args.out:
        args.out.write_text(text)
    if any(r['met'] == 'NO' for r in rows):
        print('(some goals are not met: see bench/README.md for why)')


if __name__ == '__main__':
    main()
