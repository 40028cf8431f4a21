"""The instance state machine (Shaken Fist's, wire reference §D.1), for the controller
and the nodes alike."""

from sfcommon import errors
from shakenfist.v1 import instance_pb2 as pb, wire_pb2

S = pb.InstanceState
INITIAL, PREFLIGHT, CREATING, CREATED = S.Value('INSTANCE_STATE_INITIAL'), S.Value(
    'INSTANCE_STATE_PREFLIGHT'), S.Value('INSTANCE_STATE_CREATING'), S.Value('INSTANCE_STATE_CREATED')
DELETE_WAIT, DELETED, ERROR = S.Value('INSTANCE_STATE_DELETE_WAIT'), S.Value(
    'INSTANCE_STATE_DELETED'), S.Value('INSTANCE_STATE_ERROR')
INITIAL_ERROR, PREFLIGHT_ERROR = S.Value('INSTANCE_STATE_INITIAL_ERROR'), S.Value(
    'INSTANCE_STATE_PREFLIGHT_ERROR')
CREATING_ERROR, CREATED_ERROR = S.Value('INSTANCE_STATE_CREATING_ERROR'), S.Value(
    'INSTANCE_STATE_CREATED_ERROR')
DELETE_WAIT_ERROR = S.Value('INSTANCE_STATE_DELETE_WAIT_ERROR')

# The states a node takes an instance through as it builds it, in order.
BUILD_ORDER = [INITIAL, PREFLIGHT, CREATING, CREATED]
ERROR_OF = {INITIAL: INITIAL_ERROR, PREFLIGHT: PREFLIGHT_ERROR, CREATING: CREATING_ERROR,
            CREATED: CREATED_ERROR, DELETE_WAIT: DELETE_WAIT_ERROR}
_PHASE_ERRORS = (INITIAL_ERROR, PREFLIGHT_ERROR, CREATING_ERROR, CREATED_ERROR)

# None is a new instance.
TRANSITIONS = {
    None: {INITIAL, ERROR},
    INITIAL: {PREFLIGHT, DELETE_WAIT, DELETED, INITIAL_ERROR},
    PREFLIGHT: {CREATING, DELETE_WAIT, DELETED, PREFLIGHT_ERROR},
    CREATING: {CREATED, DELETE_WAIT, DELETED, CREATING_ERROR, ERROR},
    CREATED: {DELETE_WAIT, DELETED, CREATED_ERROR, ERROR},
    **{e: {DELETE_WAIT, DELETED, ERROR} for e in _PHASE_ERRORS},
    ERROR: {DELETE_WAIT, DELETED, ERROR},
    DELETE_WAIT: {DELETED, DELETE_WAIT_ERROR},
    DELETE_WAIT_ERROR: {ERROR},
    DELETED: set(),
}

# Listed by default and found by name: everything but these.
INACTIVE = {DELETED, DELETE_WAIT_ERROR}
# Hot-plug and other changes refuse these.
TERMINAL = {DELETED, DELETE_WAIT, ERROR, DELETE_WAIT_ERROR, *_PHASE_ERRORS}


def name(state, enum=pb.InstanceState) -> str:
    """The wire string of a state (of enum: InstanceState, PowerState, AgentState), for messages."""
    value = enum.DESCRIPTOR.values_by_number.get(state) if state else None
    if value is None:
        return 'none'
    return value.GetOptions().Extensions[wire_pb2.wire_value] or value.name.lower()


def allowed(old, new) -> bool:
    return new in TRANSITIONS[old]


def check(old, new):
    """Raise STATE_CONFLICT unless old -> new is allowed."""
    if not allowed(old, new):
        raise errors.StateConflict(f'invalid state transition from {name(old)} to {name(new)}')


def is_active(state) -> bool:
    return state not in INACTIVE
