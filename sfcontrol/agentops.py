"""Agent operations: records, their state machine, routing to nodes, and deadlines.

An operation is recorded, then handed to its instance's node, which runs it
against the in-guest agent and reports progress. The controller arms a timer
on its clock for every unfinished operation's deadline (re-armed at start-up),
so an operation never outlives its deadline: if nothing finished it, it expires.
"""

import logging
import uuid as uuidlib

from sfcommon import errors, states
from sfcommon.clock import SYSTEM, Clock, Timer
from sfcommon.tasks import Tasks
from sfcontrol import caller, validation
from sfcontrol.core import Core
from sfcontrol.instances import Instances
from sfcontrol.nodeclient import NodeClients
from sfcontrol.store import keys
from sfcontrol.store.etcd import Txn
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import agent_operation_pb2 as pb
from shakenfist.v1 import agent_operation_service_pb2 as api
from shakenfist.v1 import event_pb2, instance_pb2

S = pb.AgentOperationState
INITIAL, PREFLIGHT, QUEUED, EXECUTING, COMPLETE, ERROR, EXPIRED, DELETED = (
    S.Value(f'AGENT_OPERATION_STATE_{n}') for n in
    ('INITIAL', 'PREFLIGHT', 'QUEUED', 'EXECUTING', 'COMPLETE', 'ERROR', 'EXPIRED', 'DELETED'))
FINAL = {COMPLETE, ERROR, EXPIRED, DELETED}
TRANSITIONS = {
    INITIAL: {PREFLIGHT, QUEUED, DELETED, ERROR, EXPIRED},
    PREFLIGHT: {QUEUED, DELETED, ERROR, EXPIRED},
    QUEUED: {EXECUTING, DELETED, ERROR, EXPIRED},
    EXECUTING: {COMPLETE, QUEUED, DELETED, ERROR, EXPIRED},
    COMPLETE: {DELETED}, ERROR: {DELETED}, EXPIRED: {DELETED}, DELETED: set(),
}
DEFAULT_DEADLINE = 600.0
PROGRESS_TIMEOUT = 30.0
OBJ = event_pb2.OBJECT_TYPE_INSTANCE
AUDIT = event_pb2.EVENT_TYPE_AUDIT
DISPATCH_TIMEOUT = 10.0


def _state_name(state) -> str:
    return pb.AgentOperationState.Name(state)[len('AGENT_OPERATION_STATE_'):].lower()


class AgentOperations:
    def __init__(self, core: Core, instances: Instances, nodes: NodeClients, clock: Clock = SYSTEM):
        self.core = core
        self.instances = instances
        self.nodes = nodes
        self.clock = clock
        self.tasks = Tasks('agent operations')     # the expiries under way
        self._timers: dict[str, Timer] = {}

    def start(self):
        """Arm deadline timers for unfinished operations (after a restart)."""
        for entry in self.core.cache.range(keys.AGENTOPS)[0]:
            if entry.value.state not in FINAL:
                self._arm(entry.value)

    async def stop(self):
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self.tasks.close()

    # -- lookups -----------------------------------------------------------------
    def get(self, uuid: str):
        entry = self.core.cache.get(keys.agentop(uuid))
        if entry is None or not caller.current().can_see(entry.value.namespace):
            raise errors.NotFound('agent operation not found')
        return entry

    def list(self, req: api.ListInstanceAgentOperationsRequest):
        inst = self.instances.resolve(req.instance_ref).value
        ops = [e.value for e in self.core.cache.where(keys.AGENTOPS, 'instance_uuid', inst.uuid)]
        if not req.all:
            ops = [o for o in ops if o.state in (INITIAL, PREFLIGHT, QUEUED)]
        ops.sort(key=lambda o: o.deadline)
        start = validation.page_start(req.page_token)
        end = start + (req.page_size or 1000)
        return api.ListInstanceAgentOperationsResponse(
            agent_operations=ops[start:end], next_page_token=str(end) if end < len(ops) else '')

    # -- create ---------------------------------------------------------------------
    async def execute(self, req: api.ExecuteCommandRequest):
        if not req.command_line.strip():
            raise errors.InvalidArgument('command_line: a command is required')
        commands = [pb.AgentCommand(command=pb.AGENT_COMMAND_TYPE_EXECUTE,
                                    commandline=req.command_line, block_for_result=True)]
        return await self._create(req, commands, QUEUED, req.deadline_seconds, 0.0,
                                  'agent operation execute request from API',
                                  api.ExecuteCommandResponse)

    async def get_file(self, req: api.GetFileRequest):
        if not req.path:
            raise errors.InvalidArgument('path: a path is required')
        commands = [pb.AgentCommand(command=pb.AGENT_COMMAND_TYPE_GET_FILE, path=req.path)]
        return await self._create(req, commands, QUEUED, req.deadline_seconds, PROGRESS_TIMEOUT,
                                  'agent operation get request from API', api.GetFileResponse)

    async def put_file(self, req: api.PutFileRequest):
        if not req.path:
            raise errors.InvalidArgument('path: a path is required')
        # A blob the caller may see (NOT_FOUND otherwise): never another namespace's.
        self.instances.blobs.get(req.blob_uuid)
        commands = [pb.AgentCommand(command=pb.AGENT_COMMAND_TYPE_PUT_BLOB, blob_uuid=req.blob_uuid,
                                    path=req.path),
                    pb.AgentCommand(command=pb.AGENT_COMMAND_TYPE_CHMOD, path=req.path,
                                    mode=req.mode)]     # as sent: the agent ignores type bits
        return await self._create(req, commands, PREFLIGHT, req.deadline_seconds, PROGRESS_TIMEOUT,
                                  'agent operation put request from API', api.PutFileResponse)

    async def stream_command(self, req: api.StreamCommandRequest):
        """The command's output as it runs, relayed from its node (which records its end)."""
        if not req.command_line.strip():
            raise errors.InvalidArgument('command_line: a command is required')
        inst = self._agent_ready(req.instance_ref).value
        node_req = node_pb2.StreamCommandRequest(
            instance_uuid=inst.uuid, command_line=req.command_line, stdin=req.stdin,
            deadline_seconds=req.deadline_seconds or DEFAULT_DEADLINE)
        async for piece in self.nodes.stream(inst.node, 'StreamCommand', node_req):
            out = api.StreamCommandResponse(stdout=piece.stdout, stderr=piece.stderr)
            if piece.HasField('exit'):
                out.exit.CopyFrom(piece.exit)
            yield out

    def _agent_ready(self, ref):
        """The instance, created and with a ready agent (NOT_READY, AGENT_NOT_READY otherwise)."""
        entry = self.instances.resolve(ref)
        if entry.value.state != states.CREATED:
            raise errors.NotReady(f'instance {entry.value.uuid} is not ready '
                                   f'({states.name(entry.value.state)})')
        agent = instance_pb2.AgentState.DESCRIPTOR.values_by_number[entry.value.agent_state].name
        if not agent.startswith('AGENT_STATE_READY'):
            raise errors.AgentNotReady('instance agent not ready')
        return entry

    async def _create(self, req, commands, state, deadline_seconds, progress_timeout, what,
                      response_cls):
        if deadline_seconds < 0:
            raise errors.InvalidArgument('deadline_seconds: must not be negative')
        entry = self._agent_ready(req.instance_ref)

        new_uuid = str(uuidlib.uuid4())

        def build():
            inst = entry.value
            op = pb.AgentOperation(
                uuid=new_uuid, state=state, version=1, namespace=inst.namespace,
                instance_uuid=inst.uuid, commands=commands,
                deadline=self.clock.now() + (deadline_seconds or DEFAULT_DEADLINE),
                progress_timeout=progress_timeout)
            op.metadata.SetInParent()
            txn = Txn().create(keys.agentop(op.uuid), op.SerializeToString())
            self.core.event(txn, inst.namespace, OBJ, inst.uuid, AUDIT, what,
                            {'agentoperation': op.uuid})
            return txn, response_cls(agent_operation=op)
        op = (await self.core.mutate(build, request=req)).agent_operation
        if op.uuid == new_uuid:
            # This call made it: arm its deadline and hand it to the node, once.
            self._arm(op)
            await self._dispatch(op, entry.value.node)
        # Otherwise it is a repeat of a request_id (the first response): never run it again.
        current = self.core.cache.get(keys.agentop(op.uuid)).value
        if current.state not in FINAL and current.uuid not in self._timers:
            self._arm(current)
        return response_cls(agent_operation=current)

    async def _dispatch(self, op: pb.AgentOperation, node: str):
        if op.state == PREFLIGHT:
            # A put's blob is staged: the node streams it from the blob store when
            # the put runs. The operation is queued for the node from here on.
            op = await self.update(op.uuid, QUEUED)
        try:
            await self.nodes.call(node, 'RunAgentOperation',
                                  node_pb2.RunAgentOperationRequest(operation=op),
                                  timeout=DISPATCH_TIMEOUT)
        except errors.ApiError as e:
            await self.update(op.uuid, ERROR, error_message=f'the instance\'s node could not '
                              f'take the operation: {e.message}')

    # -- progress ----------------------------------------------------------------------
    async def update(self, uuid: str, state: int, results=None, error_message=None,
                     last_progress=None):
        """Move an operation to state (recording results); refuses illegal transitions."""
        def build():
            entry = self.core.cache.get(keys.agentop(uuid))
            if entry is None:
                raise errors.NotFound('agent operation not found')
            op = pb.AgentOperation()
            op.CopyFrom(entry.value)
            if state != op.state and state not in TRANSITIONS[op.state]:
                raise errors.StateConflict(f'agent operation {uuid} cannot go from '
                                      f'{_state_name(op.state)} to {_state_name(state)}')
            op.state = state
            if results:
                for k, v in results.items():
                    op.results[k].CopyFrom(v)
            if error_message is not None:
                op.error_message = error_message
            if last_progress is not None:
                op.last_progress = last_progress
            if state == EXECUTING and entry.value.state != EXECUTING:
                op.attempts += 1
            txn = Txn().check_revision(entry.key, entry.mod_revision).put(entry.key, op.SerializeToString())
            return txn, op
        op = await self.core.mutate(build)
        if op.state in FINAL:
            timer = self._timers.pop(uuid, None)
            if timer:
                timer.cancel()
        return op

    def _arm(self, op: pb.AgentOperation):
        uuid = op.uuid
        self._timers[uuid] = self.clock.call_at(
            op.deadline, lambda: self.tasks.spawn(self._expire(uuid), name=f'expire-{uuid}'))

    async def _expire(self, uuid: str):
        self._timers.pop(uuid, None)
        entry = self.core.cache.get(keys.agentop(uuid))
        if entry is None or entry.value.state in FINAL:
            return
        try:
            caller.set_current(caller.Caller(caller.SYSTEM))
            await self.update(uuid, EXPIRED, error_message='the operation did not finish before its deadline')
        except errors.ApiError as e:
            if not isinstance(e, errors.StateConflict):     # finished meanwhile: fine
                logging.getLogger(__name__).warning('could not expire %s: %s', uuid, e)

    async def delete(self, req: api.DeleteAgentOperationRequest):
        self.get(req.agent_operation_uuid)
        op = await self.update(req.agent_operation_uuid, DELETED)
        return api.DeleteAgentOperationResponse(agent_operation=op)
