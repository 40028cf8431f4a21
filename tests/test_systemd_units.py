"""The systemd units in contrib/systemd cannot rot: each starts a console script of
this project, reads /etc/shakenfist/<unit>.env, and every variable of its example
env file is one its part declares, which that part's settings parse into the
value given."""

import configparser
import pathlib
import tomllib

import pytest

from gateway.settings import GatewaySettings
from sfcommon.settings import parse
from sfcontrol.settings import ControllerSettings
from sfnode.settings import NodeSettings

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = ROOT / 'contrib' / 'systemd'
PARTS = {'sfcontrol': ControllerSettings, 'sf-gateway': GatewaySettings, 'sfnode': NodeSettings}


def unit(name):
    c = configparser.ConfigParser(interpolation=None, strict=False)
    c.optionxform = str
    c.read(UNITS / f'{name}.service')
    return c


def example(name) -> dict[str, str]:
    lines = (UNITS / f'{name}.env.example').read_text().splitlines()
    return dict(line.split('=', 1) for line in lines if line.strip() and not line.startswith('#'))


@pytest.mark.parametrize('name', sorted(PARTS))
def test_a_unit_runs_its_console_script_with_its_env_file(name):
    service = unit(name)['Service']
    assert service['EnvironmentFile'] == f'/etc/shakenfist/{name}.env'
    assert service['ExecStart'] == f'/opt/shakenfist/venv/bin/{name}'
    scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
    assert name in scripts
    assert service['Restart'] == 'on-failure'


@pytest.mark.parametrize('name', sorted(PARTS))
def test_every_variable_of_the_example_is_declared_and_parsed(name, monkeypatch):
    cls = PARTS[name]
    declared = {cls.env_of(f): f for f in cls.model_fields if cls.env_of(f)}
    env = example(name)
    assert set(env) <= set(declared), set(env) - set(declared)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = parse(cls, [], prog=name)
    for key, value in env.items():
        assert shown(getattr(settings, declared[key])) == value, key


def shown(value) -> str:
    """A parsed setting as an env file writes it."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (tuple, list)):
        return ','.join(map(str, value))
    return str(value)


def test_a_node_unit_leaves_the_guests_running():
    assert unit('sfnode')['Service']['KillMode'] == 'process'
