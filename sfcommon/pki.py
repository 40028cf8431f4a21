"""The plane's certificates: who is who between controllers, nodes and etcd.

Two private certificate authorities per plane, both held by the operator:

- the cluster CA signs controllers and nodes. Each certificate's subject CN
  says who it is, and only the CA's holder can name one:
      controller:<name>   serves the node API, calls nodes
      node:<name>         may use the node API as node <name> only; serves NodeService
  TLS hostname checks use fixed server names (gRPC's target name override), so
  that a node's certificate can never pass for a controller or for another node:
      controller.shakenfist          every controller
      <name>.node.shakenfist         node <name>
- the etcd CA signs the etcd members and the controllers' etcd client
  certificates. Nodes hold nothing of it, so a node cannot reach etcd.

A bundle is a directory with fixed file names (ca.pem, <role>.pem, <role>.key),
written by `sf-pki` (see main()) or, for the one-command plane, by sf-up.
"""

import argparse
import dataclasses
import datetime
import ipaddress
import os
import pathlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONTROLLER_SERVER_NAME = 'controller.shakenfist'
ETCD_SERVER_NAME = 'etcd.shakenfist'     # every etcd member's certificate carries it
CA_YEARS = 10
LEAF_DAYS = 397
# Node names end up in certificate names and TLS server names: a DNS name.
NODE_NAME = re.compile(r'^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$')


def node_server_name(name: str) -> str:
    return f'{name}.node.shakenfist'


def check_node_name(name: str) -> str:
    if len(name) > 200 or not NODE_NAME.match(name):
        raise ValueError(f'node name {name!r}: a DNS name (lower case letters, digits, - and .)')
    return name


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A directory holding one party's credentials: ca.pem plus <role>.pem/.key."""
    directory: pathlib.Path
    role: str

    @property
    def ca(self) -> pathlib.Path:
        return self.directory / 'ca.pem'

    @property
    def cert(self) -> pathlib.Path:
        return self.directory / f'{self.role}.pem'

    @property
    def key(self) -> pathlib.Path:
        return self.directory / f'{self.role}.key'

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) as PEM bytes."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def exists(self) -> bool:
        return self.ca.exists() and self.cert.exists() and self.key.exists()


def _write(path: pathlib.Path, data: bytes, private: bool):
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + '.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


class Authority:
    """A CA on disk: <name>.pem and <name>.key (0600) in a directory."""

    def __init__(self, directory: pathlib.Path, name: str = 'ca'):
        self.cert_path = pathlib.Path(directory) / f'{name}.pem'
        self.key_path = pathlib.Path(directory) / f'{name}.key'
        self.name = name

    def ensure(self, common_name: str) -> 'Authority':
        """Create the CA unless it exists."""
        if self.cert_path.exists() and self.key_path.exists():
            return self
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=365 * CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _write(self.key_path, _key_pem(key), private=True)
        _write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        return self

    def issue(self, common_name: str, dns: list[str] = (), ips: list[str] = (),
              days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a party that is both TLS server and client."""
        ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(_now() - datetime.timedelta(minutes=5))
                   .not_valid_after(_now() + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def write_bundle(self, out: pathlib.Path, role: str, common_name: str, dns=(), ips=(),
                     days: int = LEAF_DAYS) -> Bundle:
        """A bundle in out: this CA as ca.pem (or <self.name>.pem), <role>.pem, <role>.key."""
        cert, key = self.issue(common_name, list(dns), list(ips), days)
        bundle = Bundle(pathlib.Path(out), role)
        _write(bundle.directory / f'{self.name}.pem', self.cert_path.read_bytes(), private=False)
        _write(bundle.cert, cert, private=False)
        _write(bundle.key, key, private=True)
        return bundle


def expires_within(cert_path: pathlib.Path, days: int) -> bool:
    if not cert_path.exists():
        return True
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc < _now() + datetime.timedelta(days=days)


# -- one machine's plane (sf-up and the tests) -----------------------------------------

@dataclasses.dataclass(frozen=True)
class LocalPki:
    """Every credential of a plane on one machine, under one directory:

        ca/ca.pem, ca/ca.key               the cluster CA
        ca/etcd-ca.pem, ca/etcd-ca.key     the etcd CA
        controller/                        ca.pem, controller.pem/.key, etcd-ca.pem,
                                           etcd-client.pem/.key
        etcd/                              etcd-ca.pem, etcd-server.pem/.key
        nodes/<name>/                      ca.pem, node.pem/.key
    """
    root: pathlib.Path

    @property
    def cluster(self) -> Authority:
        return Authority(self.root / 'ca', 'ca')

    @property
    def etcd_ca(self) -> Authority:
        return Authority(self.root / 'ca', 'etcd-ca')

    def ensure(self) -> 'LocalPki':
        self.cluster.ensure('shakenfist cluster CA')
        self.etcd_ca.ensure('shakenfist etcd CA')
        controller = self.root / 'controller'
        if expires_within(controller / 'controller.pem', 30):
            self.cluster.write_bundle(controller, 'controller', 'controller:local',
                                      dns=[CONTROLLER_SERVER_NAME], ips=['127.0.0.1'])
        if expires_within(controller / 'etcd-client.pem', 30):
            self.etcd_ca.write_bundle(controller, 'etcd-client', 'etcd-client:local')
        if expires_within(self.root / 'etcd' / 'etcd-server.pem', 30):
            self.etcd_ca.write_bundle(self.root / 'etcd', 'etcd-server', 'etcd',
                                      dns=[ETCD_SERVER_NAME, 'localhost'], ips=['127.0.0.1'])
        return self

    def controller(self) -> Bundle:
        return Bundle(self.root / 'controller', 'controller')

    def etcd_client(self) -> 'EtcdTls':
        d = self.root / 'controller'
        return EtcdTls(d / 'etcd-ca.pem', d / 'etcd-client.pem', d / 'etcd-client.key')

    def etcd_server(self) -> 'EtcdTls':
        d = self.root / 'etcd'
        return EtcdTls(d / 'etcd-ca.pem', d / 'etcd-server.pem', d / 'etcd-server.key')

    def node(self, name: str) -> Bundle:
        """Node name's bundle, issued on first use."""
        check_node_name(name)
        bundle = Bundle(self.root / 'nodes' / name, 'node')
        if not bundle.exists() or expires_within(bundle.cert, 30):
            self.cluster.write_bundle(bundle.directory, 'node', f'node:{name}',
                                      dns=[node_server_name(name)])
        return bundle


@dataclasses.dataclass(frozen=True)
class EtcdTls:
    """The files of a TLS party of etcd: its CA, certificate and key."""
    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path
    server_name: str = ETCD_SERVER_NAME     # what a client checks the members' certificates for

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


# -- sf-pki: the operator's tool ---------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(prog='sf-pki', description=(
        'Make the certificates of a multi-host plane. Keep CA_DIR (the CA keys) off the '
        'hosts you can; copy each bundle to the host it names.'))
    p.add_argument('--ca-dir', type=pathlib.Path, required=True,
                   help='where the two CAs live (created on first use)')
    sub = p.add_subparsers(dest='what', required=True)
    c = sub.add_parser('controller', help='a controller bundle (node API and etcd client)')
    c.add_argument('name')
    c.add_argument('--out', type=pathlib.Path, required=True)
    n = sub.add_parser('node', help="a node's bundle")
    n.add_argument('name')
    n.add_argument('--out', type=pathlib.Path, required=True)
    e = sub.add_parser('etcd', help='an etcd member bundle (client and peer server)')
    e.add_argument('name')
    e.add_argument('--out', type=pathlib.Path, required=True)
    e.add_argument('--ip', action='append', default=[], help='an address clients and peers use')
    e.add_argument('--dns', action='append', default=[], help='a name clients and peers use')
    s = sub.add_parser('server', help='a TLS server certificate for the public API or gateway')
    s.add_argument('name')
    s.add_argument('--out', type=pathlib.Path, required=True)
    s.add_argument('--ip', action='append', default=[])
    s.add_argument('--dns', action='append', default=[])
    args = p.parse_args(argv)
    cluster = Authority(args.ca_dir, 'ca').ensure('shakenfist cluster CA')
    etcd_ca = Authority(args.ca_dir, 'etcd-ca').ensure('shakenfist etcd CA')
    if args.what == 'controller':
        cluster.write_bundle(args.out, 'controller', f'controller:{args.name}',
                             dns=[CONTROLLER_SERVER_NAME])
        etcd_ca.write_bundle(args.out, 'etcd-client', f'etcd-client:{args.name}')
    elif args.what == 'node':
        cluster.write_bundle(args.out, 'node', f'node:{check_node_name(args.name)}',
                             dns=[node_server_name(args.name)])
    elif args.what == 'etcd':
        etcd_ca.write_bundle(args.out, 'etcd-server', args.name,
                             dns=[ETCD_SERVER_NAME, *args.dns], ips=args.ip)
    else:
        cluster.write_bundle(args.out, 'server', f'server:{args.name}', dns=args.dns or [args.name],
                             ips=args.ip)
    print(args.out)


if __name__ == '__main__':
    main()
