"""UEFI and secure boot on real TCG guests: Debian's OVMF, an NVRAM per instance, and the
sftest image's signed shim, GRUB and kernel (guest/build-image.sh) under secure boot."""

import pathlib

import pytest

from shakenfist.v1 import instance_pb2 as pb, instance_service_pb2 as api, specs_pb2
from tests.helpers import get
# The image over HTTP and a plane of one node, as the guests' tests have them.
from tests.test_e2e_guests import client, image_url, plane, stream  # noqa: F401
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
BOOT = 240      # two UEFI guests booting at once on a busy 2-core runner


async def dmesg(client, ref) -> str:
    return (await stream(client, 'dmesg', ref=ref, deadline_seconds=60))[0].decode(errors='replace')


async def test_a_uefi_guest_and_a_secure_boot_guest_boot_and_reach_their_agents(plane, client, image_url):  # noqa: F811
    # Secure boot: shim's and GRUB's allocations fail the kernel's decompression at 256 MiB.
    for name, secure, memory in (('uefi', False, 256), ('secure', True, 1024)):
        await client.instances.CreateInstance(api.CreateInstanceRequest(
            name=name, cpus=1, memory=memory, uefi=True, secure_boot=secure, vtpm=secure,
            disk=[specs_pb2.DiskSpec(size=1, base=image_url)]))
    for name in ('uefi', 'secure'):
        async def ready(name=name):
            inst = await get(client, name)
            assert inst.state != pb.INSTANCE_STATE_ERROR, inst.error_message
            return inst.agent_state == pb.AGENT_STATE_READY
        await eventually(ready, BOOT, interval=0.5, what=f'{name}: agent ready')
    uefi, secure = await get(client, 'uefi'), await get(client, 'secure')
    assert (uefi.machine_type, secure.machine_type) == (pb.MACHINE_TYPE_PC, pb.MACHINE_TYPE_Q35)

    plain_log, secure_log = await dmesg(client, 'uefi'), await dmesg(client, 'secure')
    assert 'efi: EFI v2' in plain_log and 'secureboot: Secure boot disabled' in plain_log
    assert 'secureboot: Secure boot enabled' in secure_log
    assert 'Debian Secure Boot CA' in secure_log         # the kernel Debian signed, verified
    # The secure one asked for a TPM: the guest's kernel finds a TPM 2.0 (swtpm's).
    tpm_lines = [line for line in secure_log.splitlines() if 'TPM' in line or 'tpm' in line]
    assert 'No TPM chip found' not in secure_log and tpm_lines, tpm_lines
    assert 'No TPM chip found' in plain_log

    # Each has an NVRAM of its own, kept with the instance and gone with it.
    nvrams = [plane.state / 'nodes' / i.node / 'instances' / i.uuid / 'nvram.fd' for i in (uefi, secure)]
    assert all(n.stat().st_size > 0 for n in nvrams)
    for name in ('uefi', 'secure'):
        await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=name))

    async def gone():
        return not any(n.exists() for n in nvrams)
    await eventually(gone, 60, interval=0.5, what='the NVRAM files removed with their instances')


async def test_an_nvram_template_from_a_blob_is_the_guests_first_nvram(plane, client, image_url):  # noqa: F811
    # Debian's NVRAM with Microsoft's keys enrolled and secure boot on, as a tenant's
    # template for an instance that does not ask for secure boot: its guest then boots
    # with secure boot on (the plain OVMF code honours the variables), so the template
    # is what the firmware read.
    from tests.test_blobs import upload
    template = await upload(client, pathlib.Path('/usr/share/OVMF/OVMF_VARS_4M.ms.fd').read_bytes(), 'ms-vars')
    await client.instances.CreateInstance(api.CreateInstanceRequest(
        name='templated', cpus=1, memory=1024, uefi=True, nvram_template=f'sf://blob/{template.blob_uuid}',
        disk=[specs_pb2.DiskSpec(size=1, base=image_url)]))

    async def ready():
        inst = await get(client, 'templated')
        assert inst.state != pb.INSTANCE_STATE_ERROR, inst.error_message
        return inst.agent_state == pb.AGENT_STATE_READY
    await eventually(ready, BOOT, interval=0.5, what='templated: agent ready')
    inst = await get(client, 'templated')
    assert inst.nvram_template == template.blob_uuid and not inst.secure_boot
    log = await dmesg(client, 'templated')
    assert 'secureboot: Secure boot enabled' in log, [line for line in log.splitlines() if 'ecure' in line]
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='templated'))


async def test_an_nvram_template_must_be_a_blob_of_the_namespace(client, image_url):  # noqa: F811
    import grpc
    for template, code in (('sf://blob/8a9f2a4e-0000-4000-8000-000000000000', grpc.StatusCode.NOT_FOUND),
                           ('label:ovmf', grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.instances.CreateInstance(api.CreateInstanceRequest(
                name='template', cpus=1, memory=256, uefi=True, nvram_template=template,
                disk=[specs_pb2.DiskSpec(size=1, base=image_url)]))
        assert refused.value.code() == code and 'nvram_template' in refused.value.details()
