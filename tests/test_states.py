"""The instance state machine (wire reference §D.1): the whole table, then enforcement."""

import grpc
import pytest

from sfcommon import states
from shakenfist.v1 import instance_pb2 as pb
from tests.helpers import create, get, raises
from tests.waiting import eventually

S = {states.name(v): v for v in range(1, 13)}     # wire string -> enum value

# Written out from the reference, independently of sfcontrol/states.py.
TABLE = '''
(new)             -> initial error
initial           -> preflight delete-wait deleted initial-error
preflight         -> creating delete-wait deleted preflight-error
creating          -> created delete-wait deleted creating-error error
created           -> delete-wait deleted created-error error
initial-error     -> delete-wait deleted error
preflight-error   -> delete-wait deleted error
creating-error    -> delete-wait deleted error
created-error     -> delete-wait deleted error
error             -> delete-wait deleted error
delete-wait       -> deleted delete-wait-error
delete-wait-error -> error
deleted           ->
'''


def table():
    out = {}
    for line in TABLE.strip().splitlines():
        src, _, dst = line.partition('->')
        src = src.strip()
        out[None if src == '(new)' else S[src]] = {S[d] for d in dst.split()}
    return out


def test_the_table_covers_every_state():
    assert set(table()) == {None, *S.values()}


@pytest.mark.parametrize('src', [None, *S.values()],
                         ids=lambda s: states.name(s) if s else 'new')
def test_every_transition_is_allowed_exactly_as_the_table_says(src):
    expected = table()[src]
    for dst in S.values():
        assert states.allowed(src, dst) == (dst in expected), (states.name(src), states.name(dst))


async def walk(client, node, uuid, *path):
    for state in path:
        await node.report(uuid, state=state)
    return await get(client, uuid)


async def test_the_node_cannot_skip_states(system, node):
    node.auto_create = False
    inst = await create(system)
    async with raises(grpc.StatusCode.FAILED_PRECONDITION, 'STATE_CONFLICT', 'from initial to created'):
        await node.report(inst.uuid, state=pb.INSTANCE_STATE_CREATED)
    assert (await get(system, inst.uuid)).state == pb.INSTANCE_STATE_INITIAL


async def test_an_error_while_creating_is_cleaned_up_into_error(system, node):
    node.auto_create = False
    inst = await create(system)
    failed = await walk(system, node, inst.uuid, pb.INSTANCE_STATE_PREFLIGHT, pb.INSTANCE_STATE_CREATING)
    assert failed.state == pb.INSTANCE_STATE_CREATING
    await node.report(inst.uuid, state=pb.INSTANCE_STATE_CREATING_ERROR, error_message='disk full')
    now = await get(system, inst.uuid)
    assert now.state == pb.INSTANCE_STATE_CREATING_ERROR and now.error_message == 'disk full'
    await eventually(lambda: inst.uuid not in node.desired, what='placement removed')
    # The node cleans up (its placement went) and reports it: the instance ends in error.
    await node.report(inst.uuid, state=pb.INSTANCE_STATE_DELETED)
    assert (await get(system, inst.uuid)).state == pb.INSTANCE_STATE_ERROR
    # An error instance stays until the user deletes it; then it is deleted at once.
    from shakenfist.v1 import instance_service_pb2 as api
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
    assert (await get(system, inst.uuid)).state == pb.INSTANCE_STATE_DELETED


async def test_deleted_is_terminal(system, node):
    node.auto_create = False
    inst = await create(system)
    from shakenfist.v1 import instance_service_pb2 as api
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
    await node.report(inst.uuid, state=pb.INSTANCE_STATE_DELETED)
    for state in S.values():
        if state != pb.INSTANCE_STATE_DELETED:
            async with raises(grpc.StatusCode.FAILED_PRECONDITION):
                await node.report(inst.uuid, state=state)
