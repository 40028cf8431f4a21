"""Power: off, on, pause, unpause and reboots. The node converges to the
desired power state; a reboot is a node action."""

from sfcommon import errors
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_service_pb2 as api

from .lifecycle import OFF, ON, PAUSED, A, Instances, P


class Power:
    def __init__(self, instances: Instances):
        self.instances = instances

    @staticmethod
    def _not_off(action):
        def check(inst):
            if inst.power_state in (OFF, P.Value('POWER_STATE_TRANSITION_TO_OFF')):
                raise errors.StateConflict(f'Invalid lifecycle state: you cannot {action} a powered off instance')
        return check

    async def power_off(self, req):
        def change(inst):
            inst.power_state = P.Value('POWER_STATE_TRANSITION_TO_OFF')
            inst.agent_state = A.Value('AGENT_STATE_NOT_READY_INSTANCE_POWERED_OFF')
        return await self.instances.change(req, 'poweroff', change, api.PowerOffInstanceResponse(),
                                  ready=True, desired_power=OFF)

    async def power_on(self, req):
        def change(inst):
            inst.power_state = P.Value('POWER_STATE_TRANSITION_TO_ON')
        return await self.instances.change(req, 'poweron', change, api.PowerOnInstanceResponse(),
                                  ready=True, desired_power=ON)

    async def pause(self, req):
        def change(inst):
            inst.power_state = P.Value('POWER_STATE_TRANSITION_TO_PAUSED')
            inst.agent_state = A.Value('AGENT_STATE_NOT_READY_INSTANCE_PAUSED')
        return await self.instances.change(req, 'pause', change, api.PauseInstanceResponse(),
                                  ready=True, desired_power=PAUSED, check=self._not_off('pause'))

    async def unpause(self, req):
        def change(inst):
            inst.power_state = P.Value('POWER_STATE_TRANSITION_TO_ON')
            if inst.side_channels:
                inst.agent_state = A.Value('AGENT_STATE_NOT_READY_NO_CONTACT')
        return await self.instances.change(req, 'unpause', change, api.UnpauseInstanceResponse(),
                                  ready=True, desired_power=ON, check=self._not_off('unpause'))

    async def reboot(self, req, hard: bool):
        entry = self.instances.active(req.instance_ref)
        self._not_off('reboot')(entry.value)
        response = api.HardRebootInstanceResponse() if hard else api.SoftRebootInstanceResponse()

        async def act():
            await self.instances.nodes.call(entry.value.node, 'RebootInstance', node_pb2.RebootInstanceRequest(
                instance_uuid=entry.value.uuid, hard=hard))
        return await self.instances.node_action(req, entry, 'hard reboot' if hard else 'soft reboot',
                                       act, response)
