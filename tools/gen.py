"""Generate the Python API from protos/ into shakenfist/.

One command (`make gen`, or `python tools/gen.py`) writes:
  shakenfist/**/*_pb2.py, *_pb2_grpc.py   grpcio-tools
  shakenfist/**/*.pyi                     typed stubs from mypy-protobuf
  shakenfist/descriptors.binpb            a FileDescriptorSet with imports and
                                          comments, read by the gateway and tests

The output is not committed: the Makefile regenerates it whenever a .proto
changes, so it is never stale. google/api/* is only an include path here; its
runtime modules come from googleapis-common-protos.
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / 'protos'
GOOGLEAPIS = ROOT / 'third_party' / 'googleapis'
WELL_KNOWN = pathlib.Path(grpc_tools.__file__).parent / '_proto'
DESCRIPTORS = 'descriptors.binpb'


def proto_files():
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob('*.proto'))


def generate(out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    # The mypy plugins are found on PATH, next to this interpreter.
    os.environ['PATH'] = str(pathlib.Path(sys.executable).parent) + os.pathsep + os.environ['PATH']
    args = [
        'protoc',
        f'-I{PROTOS}', f'-I{GOOGLEAPIS}', f'-I{WELL_KNOWN}',
        f'--python_out={out}', f'--grpc_python_out={out}',
        f'--mypy_out=quiet:{out}', f'--mypy_grpc_out=quiet:{out}',
        f'--descriptor_set_out={out / "shakenfist" / DESCRIPTORS}',
        '--include_imports', '--include_source_info',
    ] + proto_files()
    (out / 'shakenfist').mkdir(exist_ok=True)
    if protoc.main(args) != 0:
        raise SystemExit('protoc failed')
    # Regular packages, so that setuptools and mypy find them.
    for d in [out / 'shakenfist', *(p for p in (out / 'shakenfist').rglob('*') if p.is_dir())]:
        (d / '__init__.py').touch()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=pathlib.Path, default=ROOT,
                        help='directory to write shakenfist/ into (default: the repository)')
    args = parser.parse_args()

    if args.out == ROOT:
        # Write to a scratch tree, then swap it in, so that a failed run or a
        # removed .proto never leaves a half-updated or stale package behind.
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            generate(pathlib.Path(tmp))
            shutil.rmtree(ROOT / 'shakenfist', ignore_errors=True)
            shutil.move(os.path.join(tmp, 'shakenfist'), ROOT / 'shakenfist')
    else:
        generate(args.out)


if __name__ == '__main__':
    main()
