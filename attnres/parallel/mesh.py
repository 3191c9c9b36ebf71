"""Process groups and device meshes, shared by FSDP2 and the pipeline (plain ``torch.distributed``)."""

from __future__ import annotations

import gc

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["close_process_groups", "init_mesh"]


def close_process_groups() -> None:
    """Destroy every process group of this process and free them now, while the interpreter is alive.

    Call it last in every process that made a group, after the objects that hold one (models under
    FSDP, meshes, pipelines, trainers) are out of scope. ``destroy_process_group`` only unregisters
    the groups; a gloo group lives on while a Python object still references it, and its worker
    threads each drop their last finished collective *after* ``wait()`` has returned. Left to
    interpreter shutdown, such a thread must take the GIL to free the collective's tensors, the
    finalizing interpreter makes it exit instead, and the forced unwind through gloo's noexcept loop
    aborts the process ("terminate called without an active exception", SIGABRT; seen in about 1 of
    5 FSDP runs on a busy 2-core machine, the backtrace in ``AsyncAllgatherWork::~AsyncAllgatherWork``
    under ``PyThread_exit_thread``). Collecting the groups here runs their destructors, which join
    those threads (torch releases the GIL while destroying a group)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def init_mesh(pp: int, dp: int, device_type: str = "cpu") -> DeviceMesh:
    """The 2-D mesh ``["pp", "dp"]`` over ``pp * dp`` ranks (rank = pp_rank * dp + dp_rank: the
    data-parallel replicas of one stage are neighbours, so FSDP's collectives stay inside a node)."""
    if pp * dp != dist.get_world_size():
        raise ValueError(f"pp={pp} x dp={dp} = {pp * dp} ranks, but the world has {dist.get_world_size()}")
    return init_device_mesh(device_type, (pp, dp), mesh_dim_names=("pp", "dp"))
