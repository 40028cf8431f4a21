"""libvirt failures as ApiErrors, chosen by libvirt's error code (never by its text)."""

import contextlib

import libvirt

from sfcommon import errors


class HypervisorError(errors.ApiError):
    """A libvirt call failed. The message is for users; detail is libvirt's text.
    Subclasses take their reason from the ApiError class they also are."""
    summary = 'hypervisor error'

    def __init__(self, message: str, libvirt_code: int | None = None, detail: str = ''):
        super().__init__(message)
        self.libvirt_code = libvirt_code
        self.detail = detail

    def __str__(self):
        return f'{self.message} ({self.detail})' if self.detail else self.message


class DomainNotFound(HypervisorError, errors.NotFound):
    summary = 'no such domain'


class DeviceNotFound(HypervisorError, errors.NotFound):
    summary = 'no such device'


class DomainExists(HypervisorError, errors.AlreadyExists):
    """VIR_ERR_DOM_EXIST. (A define whose name or UUID clashes with another
    domain's is VIR_ERR_OPERATION_FAILED in libvirt 9.0, a plain HypervisorError:
    sf-<uuid> names make that clash impossible here.)"""
    summary = 'a conflicting domain exists'


class InvalidDomainState(HypervisorError, errors.StateConflict):
    """The operation is not valid in the domain's state (for example destroying a stopped one)."""
    summary = "not valid in the domain's current state"


class Unsupported(HypervisorError, errors.InvalidArgument):
    summary = 'not supported by this hypervisor'


class InvalidConfig(HypervisorError, errors.InvalidArgument):
    summary = 'invalid domain configuration'


class HypervisorUnavailable(HypervisorError, errors.Unavailable):
    summary = 'the hypervisor did not answer'


def _codes(*names):
    return {getattr(libvirt, n) for n in names if hasattr(libvirt, n)}


_ERROR_CLASSES = [
    (_codes('VIR_ERR_NO_DOMAIN'), DomainNotFound),
    (_codes('VIR_ERR_DEVICE_MISSING'), DeviceNotFound),
    (_codes('VIR_ERR_DOM_EXIST'), DomainExists),
    (_codes('VIR_ERR_OPERATION_INVALID'), InvalidDomainState),
    (_codes('VIR_ERR_NO_SUPPORT', 'VIR_ERR_CONFIG_UNSUPPORTED', 'VIR_ERR_ARGUMENT_UNSUPPORTED',
            'VIR_ERR_OPERATION_UNSUPPORTED'), Unsupported),
    (_codes('VIR_ERR_XML_ERROR', 'VIR_ERR_XML_DETAIL', 'VIR_ERR_XML_INVALID_SCHEMA',
            'VIR_ERR_INVALID_ARG'), InvalidConfig),
    (_codes('VIR_ERR_OPERATION_TIMEOUT', 'VIR_ERR_AGENT_UNRESPONSIVE', 'VIR_ERR_NO_CONNECT',
            'VIR_ERR_RPC', 'VIR_ERR_INVALID_CONN'), HypervisorUnavailable),
]


def translate_error(err: libvirt.libvirtError, action: str, ref: str = '') -> HypervisorError:
    """The HypervisorError for a libvirtError, chosen by its error code."""
    code = err.get_error_code()
    cls = next((c for codes, c in _ERROR_CLASSES if code in codes), HypervisorError)
    what = f'{action} {ref}'.strip()
    return cls(f'{what}: {cls.summary}', libvirt_code=code, detail=err.get_error_message() or '')


@contextlib.contextmanager
def libvirt_errors(action: str, ref: str = ''):
    try:
        yield
    except libvirt.libvirtError as e:
        raise translate_error(e, action, ref) from e

