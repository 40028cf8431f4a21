"""AgentOperationService and the node's progress reports (NodeControlService.UpdateAgentOperation),
against a real etcd with a scripted node (wire reference §B.1 #23-26, §B.2, §D.4, §E.5).

The controller runs on a ManualClock: deadlines pass when a test advances it, never
by waiting. One test keeps the real clock, to show its timers fire by themselves."""

import time

import grpc
import pytest
import pytest_asyncio

from sfcontrol import server
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import agent_operation_pb2 as pb
from shakenfist.v1 import agent_operation_service_pb2 as api
from shakenfist.v1 import instance_pb2
from tests.conftest import controller_config, system_key
from tests.grpc_client import Client
from tests.helpers import ManualClock, create, create_created, raises
from tests.node_double import NodeApi, NodeDouble
from tests.test_blobs import upload
from tests.waiting import eventually

C = grpc.StatusCode
QUEUED, EXECUTING, COMPLETE = (pb.AGENT_OPERATION_STATE_QUEUED, pb.AGENT_OPERATION_STATE_EXECUTING,
                               pb.AGENT_OPERATION_STATE_COMPLETE)
ERROR, EXPIRED, DELETED = (pb.AGENT_OPERATION_STATE_ERROR, pb.AGENT_OPERATION_STATE_EXPIRED,
                           pb.AGENT_OPERATION_STATE_DELETED)
PREFLIGHT = pb.AGENT_OPERATION_STATE_PREFLIGHT
DEADLINE = 60.0     # seconds: a round number of the test's clock, never waited for


@pytest.fixture
def clock():
    return ManualClock()


@pytest_asyncio.fixture
async def controller(etcd, tmp_path, clock):
    """The conftest controller, on the test's clock (and heartbeats that outlast what tests
    advance it by: liveness is tests/test_node_liveness.py's)."""
    ctl = await server.start(controller_config(etcd, tmp_path, clock=clock, heartbeat_timeout=3600))
    yield ctl
    await ctl.stop(None)


async def advance(ctl, clock, seconds):
    """Move the controller's clock on, and wait for the expiries its timers started."""
    clock.advance(seconds)
    await ctl.agentops.tasks.wait_idle()


async def ready_instance(client, node, name='inst1', agent_state=instance_pb2.AGENT_STATE_READY):
    inst = await create_created(client, name)
    await node.report(inst.uuid, agent_state=agent_state)
    return inst


async def execute(client, ref='inst1', command_line='uname -a', **kw):
    return (await client.agentops.ExecuteCommand(api.ExecuteCommandRequest(
        instance_ref=ref, command_line=command_line, **kw))).agent_operation


async def get_op(client, uuid):
    return (await client.agentops.GetAgentOperation(
        api.GetAgentOperationRequest(agent_operation_uuid=uuid))).agent_operation


async def list_ops(client, ref='inst1', all=False):
    return (await client.agentops.ListInstanceAgentOperations(
        api.ListInstanceAgentOperationsRequest(instance_ref=ref, all=all))).agent_operations


async def node_update(node, uuid, state, name=None, **kw):
    """Node node reports on an operation (as the node it claims to be: name)."""
    await node.node_control.UpdateAgentOperation(node_pb2.UpdateAgentOperationRequest(
        node=name or node.name, uuid=uuid, state=state, **kw))


def dispatched(node):
    return [r.operation for name, r in node.calls if name == 'RunAgentOperation']


async def wait_op_state(client, uuid, state, timeout=5.0):
    async def check():
        op = await get_op(client, uuid)
        return op if op.state == state else None
    return await eventually(check, timeout, what=f'op {uuid} in {pb.AgentOperationState.Name(state)}')


# -- preconditions ------------------------------------------------------------------------------

@pytest.mark.parametrize('agent_state', [
    None, instance_pb2.AGENT_STATE_NOT_READY_NO_CONTACT, instance_pb2.AGENT_STATE_NOT_READY_STARTING,
    instance_pb2.AGENT_STATE_NOT_READY_INSTANCE_POWERED_OFF,
])
async def test_execute_needs_a_ready_agent(system, node, agent_state):
    inst = await create_created(system)
    if agent_state is not None:
        await node.report(inst.uuid, agent_state=agent_state)
    async with raises(C.FAILED_PRECONDITION, 'AGENT_NOT_READY', 'instance agent not ready'):
        await execute(system)
    async with raises(C.FAILED_PRECONDITION, 'AGENT_NOT_READY', 'instance agent not ready'):
        await system.agentops.GetFile(api.GetFileRequest(instance_ref='inst1', path='/etc/hostname'))
    assert await list_ops(system, all=True) == []
    assert dispatched(node) == []


async def test_a_degraded_agent_is_ready_enough(system, node):
    await ready_instance(system, node, agent_state=instance_pb2.AGENT_STATE_READY_DEGRADED)
    assert (await execute(system)).state == QUEUED


async def test_execute_on_an_instance_not_yet_created_is_not_ready(system, node):
    node.auto_create = False
    inst = await create(system)
    async with raises(C.UNAVAILABLE, 'NOT_READY', f'instance {inst.uuid} is not ready (initial)'):
        await execute(system)
    assert await list_ops(system, all=True) == []


async def test_execute_on_unknown_instance_is_not_found(system, node):
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'instance not found'):
        await execute(system, 'nope')


@pytest.mark.parametrize('change,message', [
    (dict(command_line='   '), 'command_line'),
    (dict(deadline_seconds=-1), 'deadline_seconds'),
])
async def test_bad_execute_is_invalid_argument(system, node, change, message):
    await ready_instance(system, node)
    kw = dict(command_line='true')
    kw.update(change)
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', message):
        await execute(system, **kw)
    assert await list_ops(system, all=True) == []


# -- execute, progress, results ----------------------------------------------------------------------

async def test_execute_queues_an_operation_and_routes_it_to_the_node(system, node, clock):
    inst = await ready_instance(system, node)
    op = await execute(system, command_line='cat /tmp/x')
    assert op.state == QUEUED and op.namespace == 'system' and op.instance_uuid == inst.uuid
    assert list(op.commands) == [pb.AgentCommand(
        command=pb.AGENT_COMMAND_TYPE_EXECUTE, commandline='cat /tmp/x', block_for_result=True)]
    assert dict(op.results) == {} and op.attempts == 0 and not op.HasField('error_message')
    assert op.deadline == clock.now() + 600         # the default deadline
    (sent,) = dispatched(node)
    assert sent.uuid == op.uuid and list(sent.commands) == list(op.commands)
    assert (await get_op(system, op.uuid)).state == QUEUED


async def test_node_reports_progress_and_results(system, node):
    await ready_instance(system, node)
    op = await execute(system, command_line='cat /tmp/x')
    await node_update(node, op.uuid, EXECUTING, last_progress=1234.5)
    running = await get_op(system, op.uuid)
    assert running.state == EXECUTING and running.attempts == 1 and running.last_progress == 1234.5
    result = pb.AgentCommandResult(command='execute-response', command_line='cat /tmp/x',
                                   return_code=0, stdout='hello\n', stderr='')
    await node_update(node, op.uuid, COMPLETE, results={'0': result})
    done = await get_op(system, op.uuid)
    assert done.state == COMPLETE and dict(done.results) == {'0': result}
    assert done.results['0'].HasField('stderr')      # the library reads results['0']['stderr']
    assert done.attempts == 1


async def test_illegal_transitions_are_state_conflict(system, node):
    await ready_instance(system, node)
    op = await execute(system)
    async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT', 'cannot go from queued to complete'):
        await node_update(node, op.uuid, COMPLETE)
    await node_update(node, op.uuid, EXECUTING)
    await node_update(node, op.uuid, EXECUTING)       # a repeated report is not a transition
    await node_update(node, op.uuid, COMPLETE)
    for state in (EXECUTING, QUEUED, ERROR):
        async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT', 'cannot go from complete'):
            await node_update(node, op.uuid, state)
    done = await get_op(system, op.uuid)
    assert done.state == COMPLETE and done.attempts == 1


async def test_executing_may_be_requeued_for_a_retry(system, node):
    await ready_instance(system, node)
    op = await execute(system)
    await node_update(node, op.uuid, EXECUTING)
    await node_update(node, op.uuid, QUEUED)
    await node_update(node, op.uuid, EXECUTING)
    assert (await get_op(system, op.uuid)).attempts == 2


async def test_node_error_is_recorded_with_its_message(system, node):
    await ready_instance(system, node)
    op = await execute(system)
    await node_update(node, op.uuid, EXECUTING)
    await node_update(node, op.uuid, ERROR, error_message='agent went away')
    failed = await get_op(system, op.uuid)
    assert failed.state == ERROR and failed.error_message == 'agent went away'


async def test_update_of_unknown_operation_is_not_found(system, node):
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'agent operation not found'):
        await node_update(node, 'nope', EXECUTING)


async def test_only_the_instances_node_may_update_its_operations(system, node, node_api):
    await ready_instance(system, node)
    op = await execute(system)
    other = await NodeDouble(node_api, 'node2').start()
    try:
        async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT', 'node2'):
            await node_update(other, op.uuid, EXECUTING)
        async with raises(C.PERMISSION_DENIED, 'PERMISSION_DENIED', 'node2'):
            await node_update(other, op.uuid, EXECUTING, name='node1')
    finally:
        await other.stop()
    assert (await get_op(system, op.uuid)).state == QUEUED


async def test_update_needs_a_node_certificate_not_a_token(system, tenant, node):
    await ready_instance(system, node)
    op = await execute(system)
    for client in (system, tenant):
        async with raises(C.UNAUTHENTICATED, 'UNAUTHENTICATED', 'node certificate'):
            await node_update(client, op.uuid, EXECUTING, name='node1')
    assert (await get_op(system, op.uuid)).state == QUEUED


# -- deadlines -----------------------------------------------------------------------------------------

async def test_an_unfinished_operation_expires_at_its_deadline(system, node, controller, clock):
    await ready_instance(system, node)
    op = await execute(system, deadline_seconds=DEADLINE)
    assert op.state == QUEUED and op.deadline == clock.now() + DEADLINE
    await advance(controller, clock, DEADLINE - 0.5)
    assert (await get_op(system, op.uuid)).state == QUEUED      # not a moment early
    await advance(controller, clock, 0.5)
    expired = await get_op(system, op.uuid)
    assert expired.state == EXPIRED and 'deadline' in expired.error_message
    async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT'):
        await node_update(node, op.uuid, COMPLETE)
    assert (await get_op(system, op.uuid)).state == EXPIRED


async def test_an_executing_operation_expires_too(system, node, controller, clock):
    await ready_instance(system, node)
    op = await execute(system, deadline_seconds=DEADLINE)
    await node_update(node, op.uuid, EXECUTING)
    await advance(controller, clock, DEADLINE - 0.5)
    assert (await get_op(system, op.uuid)).state == EXECUTING
    await advance(controller, clock, 0.5)
    assert (await get_op(system, op.uuid)).state == EXPIRED


async def test_a_finished_operation_does_not_expire(system, node, controller, clock):
    await ready_instance(system, node)
    done = await execute(system, deadline_seconds=DEADLINE)
    await node_update(node, done.uuid, EXECUTING)
    await node_update(node, done.uuid, COMPLETE)
    assert done.deadline not in clock.pending       # its timer went with it
    await advance(controller, clock, 2 * DEADLINE)
    assert (await get_op(system, done.uuid)).state == COMPLETE


async def queued_by_a_stopped_controller(config, etcd, tmp_path):
    """An operation queued (its node never answers) by a controller that then stopped."""
    ctl = await server.start(config)
    client = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    node = await NodeDouble(NodeApi.of(ctl, etcd.pki)).start()
    try:
        await ready_instance(client, node)
        return await execute(client, deadline_seconds=DEADLINE)
    finally:
        await node.stop()
        await client.close()
        await ctl.stop(None)


async def test_deadlines_are_rearmed_after_a_controller_restart(etcd, tmp_path):
    clock = ManualClock()
    config = controller_config(etcd, tmp_path, clock=clock, heartbeat_timeout=3600)
    op = await queued_by_a_stopped_controller(config, etcd, tmp_path)
    clock.advance(DEADLINE / 2)         # while no controller runs: nothing to expire it
    ctl = await server.start(config)
    client = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    try:
        await advance(ctl, clock, DEADLINE / 2 - 0.5)
        assert (await get_op(client, op.uuid)).state == QUEUED
        await advance(ctl, clock, 0.5)
        expired = await get_op(client, op.uuid)
        assert expired.state == EXPIRED and 'deadline' in expired.error_message
    finally:
        await client.close()
        await ctl.stop(None)


async def test_a_deadline_passed_while_no_controller_ran_expires_at_start_up(etcd, tmp_path):
    clock = ManualClock()
    config = controller_config(etcd, tmp_path, clock=clock, heartbeat_timeout=3600)
    op = await queued_by_a_stopped_controller(config, etcd, tmp_path)
    clock.advance(2 * DEADLINE)
    ctl = await server.start(config)
    client = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    try:
        await advance(ctl, clock, 0)        # due at once: its timer fires on the first tick
        assert (await get_op(client, op.uuid)).state == EXPIRED
    finally:
        await client.close()
        await ctl.stop(None)


async def test_on_the_real_clock_an_operation_expires_by_itself(etcd, tmp_path):
    """The one deadline left to the wall clock: SystemClock's timers fire unprompted."""
    ctl = await server.start(controller_config(etcd, tmp_path))
    client = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    node = await NodeDouble(NodeApi.of(ctl, etcd.pki)).start()
    try:
        await ready_instance(client, node)
        op = await execute(client, deadline_seconds=0.2)
        expired = await wait_op_state(client, op.uuid, EXPIRED, timeout=5)
        assert time.time() >= op.deadline and 'deadline' in expired.error_message
    finally:
        await node.stop()
        await client.close()
        await ctl.stop(None)


# -- get and put -------------------------------------------------------------------------------------------

async def test_get_file_queues_a_get_file_command(system, node):
    inst = await ready_instance(system, node)
    op = (await system.agentops.GetFile(api.GetFileRequest(
        instance_ref='inst1', path='/etc/hostname'))).agent_operation
    assert op.state == QUEUED and op.instance_uuid == inst.uuid
    assert list(op.commands) == [pb.AgentCommand(command=pb.AGENT_COMMAND_TYPE_GET_FILE,
                                                 path='/etc/hostname')]
    assert op.progress_timeout > 0
    assert [o.uuid for o in dispatched(node)] == [op.uuid]
    async with raises(C.INVALID_ARGUMENT, match='path'):
        await system.agentops.GetFile(api.GetFileRequest(instance_ref='inst1'))


async def test_put_file_is_staged_and_queued_with_put_blob_and_chmod(system, node):
    await ready_instance(system, node)
    art = await upload(system, b'#!/bin/sh\necho hi\n', name='script')
    op = (await system.agentops.PutFile(api.PutFileRequest(
        instance_ref='inst1', blob_uuid=art.blob_uuid, path='/tmp/x', mode=0o100755))).agent_operation
    # Created in preflight; the blob is staged at once (the node streams it from the
    # blob store when the put runs), so by the time the call returns it is queued.
    assert op.state == QUEUED
    assert list(op.commands) == [
        pb.AgentCommand(command=pb.AGENT_COMMAND_TYPE_PUT_BLOB, blob_uuid=art.blob_uuid, path='/tmp/x'),
        pb.AgentCommand(command=pb.AGENT_COMMAND_TYPE_CHMOD, path='/tmp/x', mode=0o100755)]   # as sent
    assert [o.uuid for o in dispatched(node)] == [op.uuid]
    assert [o.uuid for o in await list_ops(system)] == [op.uuid]
    for state in (QUEUED, EXECUTING, COMPLETE):
        await node_update(node, op.uuid, state)
    assert (await get_op(system, op.uuid)).state == COMPLETE


async def test_put_file_with_a_missing_blob_is_not_found(system, node):
    await ready_instance(system, node)
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'blob not found'):
        await system.agentops.PutFile(api.PutFileRequest(
            instance_ref='inst1', blob_uuid='00000000-0000-0000-0000-000000000000',
            path='/tmp/x', mode=0o100644))
    assert await list_ops(system, all=True) == []


@pytest.mark.parametrize('change,message', [
    (dict(mode=-1), 'mode: must be from 0 to 65535'),       # the schema's limit
    (dict(mode=0o1000000), 'mode: must be from 0 to 65535'),
    (dict(path=''), 'path'),
])
async def test_bad_put_file_is_invalid_argument(system, node, change, message):
    await ready_instance(system, node)
    kw = dict(instance_ref='inst1', blob_uuid='00000000-0000-0000-0000-000000000000',
              path='/tmp/x', mode=0o644)
    kw.update(change)
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', message):
        await system.agentops.PutFile(api.PutFileRequest(**kw))
    assert await list_ops(system, all=True) == []


# -- list, get, delete ---------------------------------------------------------------------------------------

async def test_list_shows_queued_operations_or_all_of_them(system, node):
    await ready_instance(system, node)
    await ready_instance(system, node, 'other')
    a = await execute(system, command_line='a')
    b = await execute(system, command_line='b')
    c = await execute(system, command_line='c')
    theirs = await execute(system, 'other', command_line='x')
    await node_update(node, a.uuid, EXECUTING)
    await node_update(node, a.uuid, COMPLETE)
    await node_update(node, b.uuid, EXECUTING)
    assert [o.uuid for o in await list_ops(system)] == [c.uuid]
    assert sorted(o.uuid for o in await list_ops(system, all=True)) == sorted([a.uuid, b.uuid, c.uuid])
    assert [o.uuid for o in await list_ops(system, 'other', all=True)] == [theirs.uuid]


async def test_get_unknown_operation_is_not_found(system):
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'agent operation not found'):
        await get_op(system, 'nope')


async def test_another_namespace_cannot_see_or_delete_an_operation(system, tenant, node):
    await ready_instance(system, node)
    op = await execute(system)
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'agent operation not found'):
        await get_op(tenant, op.uuid)
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'agent operation not found'):
        await tenant.agentops.DeleteAgentOperation(api.DeleteAgentOperationRequest(
            agent_operation_uuid=op.uuid))
    async with raises(C.NOT_FOUND):
        await list_ops(tenant, op.instance_uuid, all=True)
    assert (await get_op(system, op.uuid)).state == QUEUED


async def test_delete_marks_the_operation_deleted(system, node, controller, clock):
    await ready_instance(system, node)
    queued = await execute(system, command_line='a', deadline_seconds=DEADLINE)
    done = await execute(system, command_line='b')
    await node_update(node, done.uuid, EXECUTING)
    await node_update(node, done.uuid, COMPLETE)
    for op in (queued, done):
        r = await system.agentops.DeleteAgentOperation(api.DeleteAgentOperationRequest(
            agent_operation_uuid=op.uuid))
        assert r.agent_operation.uuid == op.uuid and r.agent_operation.state == DELETED
        assert (await get_op(system, op.uuid)).state == DELETED
    assert await list_ops(system) == []
    assert {o.state for o in await list_ops(system, all=True)} == {DELETED}
    async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT'):
        await node_update(node, queued.uuid, EXECUTING)
    # Its deadline was disarmed: passing it leaves it deleted, not expired.
    assert queued.deadline not in clock.pending
    await advance(controller, clock, 2 * DEADLINE)
    assert (await get_op(system, queued.uuid)).state == DELETED


# -- dispatch failures and retries -----------------------------------------------------------------------

async def test_an_unreachable_node_puts_the_operation_in_error(system, node):
    await ready_instance(system, node)
    await node.server.stop(None)           # the node's NodeService no longer answers
    op = await execute(system)
    assert op.state == ERROR
    assert 'node could not take the operation' in op.error_message
    stored = await get_op(system, op.uuid)
    assert stored.state == ERROR and stored.error_message == op.error_message
    assert await list_ops(system) == []


async def test_same_request_id_gives_one_operation_dispatched_once(system, node):
    await ready_instance(system, node)
    first = await execute(system, request_id='exec-1')
    second = await execute(system, request_id='exec-1')
    assert first.uuid == second.uuid
    assert [o.uuid for o in await list_ops(system, all=True)] == [first.uuid]
    assert [o.uuid for o in dispatched(node)] == [first.uuid]
    # Retried after it finished: still the one operation, and it is not run again.
    await node_update(node, first.uuid, EXECUTING)
    await node_update(node, first.uuid, COMPLETE)
    third = await execute(system, request_id='exec-1')
    assert third.uuid == first.uuid and third.state == COMPLETE
    assert [o.uuid for o in dispatched(node)] == [first.uuid]
    async with raises(C.INVALID_ARGUMENT, match='already used'):
        await execute(system, command_line='something else', request_id='exec-1')
