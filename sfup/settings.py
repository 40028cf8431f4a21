"""sf-up's settings (`sf-up --help`): flags, SF_UP_* variables and defaults, each
declared once (the mechanism: sfcommon/settings.py)."""

import pathlib

from sfcommon.settings import CommaList, Settings, setting


class UpSettings(Settings):
    state_dir: pathlib.Path = setting(env='SF_UP_STATE_DIR',
                                      help="the plane's etcd data, keys, certificates, nodes and logs")
    nodes: int = setting(1, env='SF_UP_NODES', ge=0,
                         help='node agents to run, each with an underlay namespace of its own '
                              '(as root); node0 is the network node (DHCP and DNS)')
    grpc_port: int = setting(13001, env='SF_UP_GRPC_PORT', ge=0, le=65535, help='0 picks a free port')
    rest_port: int = setting(13000, env='SF_UP_REST_PORT', ge=0, le=65535, help='0 picks a free port')
    host: str = setting('127.0.0.1', env='SF_UP_HOST', help='address to listen on')
    image_allow: CommaList = setting(
        (), env='SF_IMAGE_ALLOW', metavar='PREFIX',
        help='a URL prefix tenants may use as an image though it is a local file or an internal '
             'address (repeatable, or comma-separated in the variable; the sftest shorthand needs '
             'none); the controller and the nodes get the same list')
    host_route: bool = setting(
        False, env='SF_UP_HOST_ROUTE',
        help="let this machine itself reach the floating addresses: sf-up adds one route in the root "
             "namespace (the pool via a veth of the plane's own into the edge, 198.19.255.0/30) and "
             "removes it on stop; off by default, as it changes the host's routing table")
