"""Settings: one typed model per process, each setting declared once.

A part's settings are a `Settings` subclass (sfcontrol/settings.py, sfnode/settings.py,
gateway/settings.py, sfup/settings.py). Each field says, in one place, its type, its
default, its SF_* environment variable and its help:

    token_ttl: int = setting(900, env='SF_TOKEN_TTL', flag='--token-ttl', gt=0,
                             help='token lifetime in seconds')

`parse(Settings, argv)` makes the command line from the fields (argparse), reads the
environment through pydantic-settings and validates once: a flag given wins over its
variable, which wins over the default. A bad value is one line on stderr naming the
flag or variable it came from, and exit code 2, as argparse does for its own errors.

Flags: a bool field is a switch (`--stop-guests-on-exit`); a tuple field repeats
(`--image-allow A --image-allow B`), and its variable is comma-separated. A repeated
flag replaces the variable's list rather than adding to it (flag > env, as for the rest).
Every other value travels as text and pydantic converts it, so a flag and its variable
are checked by the same rules and fail with the same message. An empty variable counts
as unset.
"""

import argparse
import json
import sys
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import pydantic
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

S = TypeVar('S', bound='Settings')

_UNSET: Any = ...


def setting(default: Any = _UNSET, *, help: str, env: str | None = None, flag: str | None = None,
            default_factory=None, metavar: str | None = None, **constraints) -> Any:
    """A field: its default, its SF_* variable (None: flag only), its flag (default:
    from the field's name, `state_dir` -> `--state-dir`), its help; `constraints` are
    pydantic's (gt=0, ge=0, le=65535...)."""
    extra = {'env': env, 'flag': flag, 'metavar': metavar}
    if default_factory is not None:
        return Field(default_factory=default_factory, validation_alias=env, description=help,
                     json_schema_extra=extra, **constraints)
    return Field(default, validation_alias=env, description=help, json_schema_extra=extra, **constraints)


def _meta(field: FieldInfo) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


# ------------------------------------------------------------------ value types

def _comma_split(value):
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(',') if v.strip())
    return value


def _host_port(value: str) -> str:
    _, sep, port = value.rpartition(':')
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f'expected HOST:PORT, got {value!r}')
    return value


def _json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f'not JSON: {e}') from None
    return value


# A repeatable flag; its variable is comma-separated (NoDecode: not pydantic-settings' JSON).
CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_split)]
# 'host:port' (port 0 picks a free one); kept as written, IPv6 as [::1]:13001.
HostPort = Annotated[str, AfterValidator(_host_port)]
# A JSON object given as text, on the command line or in a variable.
JsonObject = Annotated[dict[str, str], NoDecode, BeforeValidator(_json)]
LogLevel = Annotated[Literal['debug', 'info', 'warning', 'error', 'critical'],
                     BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]


def split_host_port(value: str, default_host: str = '0.0.0.0') -> tuple[str, int]:
    """'[::1]:80' -> ('::1', 80); ':80' -> (default_host, 80)."""
    host, _, port = value.rpartition(':')
    return host.strip('[]') or default_host, int(port)


# ------------------------------------------------------------------ the model

class _DeclaredEnvOnly(EnvSettingsSource):
    """The environment, for the fields that declare a variable; a flag-only field
    (`--out`) is never read from a variable named after it."""

    def get_field_value(self, field: FieldInfo, field_name: str):
        if not _meta(field).get('env'):
            return None, field_name, False
        return super().get_field_value(field, field_name)


class Settings(BaseSettings):
    """Base of every part's settings. Values come from keyword arguments (the parsed
    flags), then the declared variables, then the defaults."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra='forbid',
                                      validate_by_name=True, validate_by_alias=True, frozen=True)

    log_level: LogLevel = setting('info', env='SF_LOG_LEVEL', help='debug, info, warning, error or critical')

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _DeclaredEnvOnly(settings_cls)

    @classmethod
    def flag_of(cls, name: str) -> str:
        return _meta(cls.model_fields[name]).get('flag') or '--' + name.replace('_', '-')

    @classmethod
    def env_of(cls, name: str) -> str | None:
        return _meta(cls.model_fields[name]).get('env')


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit code 2 (argparse's own error prints the usage first)."""
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _kind(annotation) -> str:
    """'switch', 'repeat' or 'value': how the field's flag is given."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if annotation is bool:
        return 'switch'
    if get_origin(annotation) in (tuple, list):
        return 'repeat'
    return 'value'


def _help(cls: type['Settings'], name: str, field: FieldInfo) -> str:
    text = field.description or ''
    env = cls.env_of(name)
    notes = [f'env {env}'] if env else []
    if field.is_required():
        notes.append('required')
    elif field.default_factory is None and field.default not in (None, (), False, {}):
        notes.append(f'default {field.default}')
    return f'{text} ({"; ".join(notes)})' if notes else text


def parser(cls: type['Settings'], prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command line made from the fields. Defaults stay out of argparse (SUPPRESS):
    only the flags given reach the model, which fills in the rest."""
    p = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    common_last = sorted(cls.model_fields.items(), key=lambda item: item[0] in Settings.model_fields)
    for name, field in common_last:
        kind = _kind(field.annotation)
        common = {'dest': name, 'help': _help(cls, name, field).replace('%', '%%')}
        if kind == 'switch':
            p.add_argument(cls.flag_of(name), action='store_true', **common)
        else:
            metavar = _meta(field).get('metavar') or name.upper()
            p.add_argument(cls.flag_of(name), action='append' if kind == 'repeat' else 'store',
                           metavar=metavar, **common)
    return p


def _describe(cls: type['Settings'], error: pydantic.ValidationError, given: dict) -> str:
    """The first problem, naming where the value came from (flag or variable)."""
    first = error.errors(include_url=False)[0]
    message = first['msg'].removeprefix('Value error, ')
    where = first['loc'][0] if first['loc'] else None
    name = next((n for n in cls.model_fields if where in (n, cls.env_of(n))), None)
    if name is None:
        return message
    flag, env = cls.flag_of(name), cls.env_of(name)
    if first['type'] == 'missing':
        return f'{flag} is required' + (f' (or {env})' if env else '')
    if name in given:
        source = f'{flag} {given[name]!r}' if not isinstance(given[name], list) else f'{flag}'
    else:
        source = f'{env}={first["input"]!r}'
    return f'{source}: {message}'


def parse(cls: type[S], argv: list[str] | None = None, *, prog: str, description: str | None = None) -> S:
    """Settings from argv (default sys.argv[1:]), the environment and the defaults;
    exits 2 with one line on a bad value."""
    p = parser(cls, prog, description)
    given = vars(p.parse_args(sys.argv[1:] if argv is None else list(argv)))
    try:
        return cls(**given)
    except pydantic.ValidationError as e:
        p.error(_describe(cls, e, given))
