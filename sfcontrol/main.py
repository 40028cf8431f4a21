"""sfcontrol: run the controller. Settings come from flags or SF_* environment variables
(sfcontrol/settings.py; `sfcontrol --help` lists them)."""

from sfcommon import pki, serve
from sfcommon.settings import parse
from sfcontrol import server
from sfcontrol.settings import ControllerSettings


def settings_from(argv=None) -> ControllerSettings:
    return parse(ControllerSettings, argv, prog='sfcontrol', description=__doc__.splitlines()[0])


def config_from(settings: ControllerSettings) -> server.Config:
    d = settings.pki_dir
    return server.Config(
        etcd_endpoints=settings.etcd_endpoints, listen=settings.listen_address,
        tls_cert=settings.tls_cert, tls_key=settings.tls_key, node_listen=settings.node_listen,
        pki=pki.Bundle(d, 'controller'),
        etcd_tls=pki.EtcdTls(d / 'etcd-ca.pem', d / 'etcd-client.pem', d / 'etcd-client.key'),
        state_dir=settings.state_dir, store_prefix=settings.prefix,
        token_ttl=settings.token_ttl, floating_netblock=settings.floating_netblock,
        image_allow=settings.image_allow, max_blob_size=settings.max_blob_size,
        namespace_quota=settings.namespace_quota, metrics_listen=settings.metrics_listen,
        peer_address=settings.peer_address, blob_copies=settings.blob_copies,
        blob_holder_ttl=settings.blob_holder_ttl)


async def start(settings: ControllerSettings, stops: serve.Stops):
    controller = await server.start(config_from(settings))
    stops.add('controller', controller.stop)


def main(argv=None):
    serve.run('sfcontrol', settings_from(argv), start)


if __name__ == '__main__':
    main()
