"""Data parallelism on a device mesh, from one CPU to many hosts.

One code path serves every scale: a 1-D :class:`jax.sharding.Mesh` with a ``data`` axis
over *all* devices of *all* processes, the batch sharded along ``data``, parameters and
optimizer state replicated, and the train step compiled once with ``jax.jit`` over
global arrays. XLA's SPMD partitioner turns the batch mean in the loss into per-device
partial sums and an all-reduce, so gradients are averaged across devices without any
explicit collective in our code (and with one device nothing changes).

Multi-host launch: start one Python process per host (on CPU, any number per machine),
each calling :func:`initialize_distributed` (``jax.distributed.initialize``) before
touching devices, e.g.::

    # host i of n (i = 0 is the coordinator)
    python train.py --coordinator host0:1234 --num-processes n --process-id i

Every process runs the same program. Each one loads only its own slice of the global
batch (:func:`process_batch_slice`) and :func:`shard_batch` assembles the global array
with ``jax.make_array_from_process_local_data``. On CPU the cross-process collectives
use gloo, JAX's default ``jax_cpu_collectives_implementation`` since 0.4.3x; on GPU/TPU
they use NCCL/ICI. Nothing here assumes a single host.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "initialize_distributed",
    "make_mesh",
    "data_sharding",
    "replicated_sharding",
    "shard_batch",
    "replicate",
    "is_main_process",
    "process_batch_slice",
    "check_batch_divisible",
    "sync_flag",
]

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None, **kwargs
) -> None:
    """Start JAX's multi-process runtime (one process per host), if asked to.

    Calls ``jax.distributed.initialize`` when ``num_processes > 1`` or when no argument
    is given and the cluster environment (``JAX_COORDINATOR_ADDRESS``, SLURM, Cloud TPU,
    ...) is left to JAX's auto-detection via ``JDIFF_DISTRIBUTED=1``. A single process
    (``num_processes`` of 1 or None without the environment flag) does nothing, so the
    same script runs unchanged on a laptop. Must run before any JAX computation.
    """
    if num_processes is not None and num_processes <= 1:
        return
    if num_processes is None and coordinator_address is None and os.environ.get("JDIFF_DISTRIBUTED") != "1":
        return
    # CPU collectives across processes need an implementation; gloo is JAX's default in
    # recent versions, older ones defaulted to none.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
    )


def make_mesh(devices=None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) with one
    ``Auto`` axis named ``axis_name``.

    Devices are ordered by ``(process_index, id)``, so process ``p`` owns a contiguous
    block of the global batch: rows ``process_batch_slice(global_batch)``. (``jax.make_mesh``
    defaults to Explicit axes, which an ordinary jitted step does not want.)
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device")
    devs.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs, dtype=object), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D data mesh, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's data axis, the rest replicated."""
    return NamedSharding(mesh, P(_axis(mesh)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def is_main_process() -> bool:
    """True on process 0, the one that logs."""
    return jax.process_index() == 0


def _local_devices_in(mesh: Mesh) -> int:
    return sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())


def process_batch_slice(global_batch_size: int, mesh: Mesh | None = None) -> slice:
    """The rows of a global batch that this process loads and passes to
    :func:`shard_batch` (contiguous; the mesh orders devices by process)."""
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    check_batch_divisible(global_batch_size, n_dev)
    per_dev = global_batch_size // n_dev
    start = sum(1 for d in mesh.devices.flat if d.process_index < jax.process_index()) * per_dev
    return slice(start, start + _local_devices_in(mesh) * per_dev)


def check_batch_divisible(
    batch_size: int, num_devices: int, what: str = "batch", where: str = "the number of devices on the data axis"
) -> None:
    """Raise a ``ValueError`` naming both numbers unless ``batch_size`` is a positive
    multiple of ``num_devices``."""
    if num_devices <= 0 or batch_size % num_devices != 0 or batch_size == 0:
        raise ValueError(
            f"the {what} size {batch_size} is not divisible by {where} ({num_devices}); "
            f"use a batch size that is a multiple of {num_devices}"
        )


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Turn this process's slice of the batch into global arrays sharded along ``data``.

    Every leaf is an array with a leading batch axis. With ``P`` processes each holding
    ``b`` rows the result has ``P * b`` rows, process ``p``'s rows at
    :func:`process_batch_slice`. Raises ``ValueError`` if the local batch does not
    split evenly over this process's devices.
    """
    sharding = data_sharding(mesh)
    n_local = _local_devices_in(mesh)
    n_total = mesh.devices.size

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("every batch leaf needs a leading batch axis; got a scalar")
        check_batch_divisible(
            x.shape[0], n_local, "per-process batch", "the number of this process's devices on the data axis"
        )
        global_shape = (x.shape[0] // n_local * n_total,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy every leaf to every device of ``mesh`` (all processes must pass equal
    values: parameters initialized from the same seed, a restored checkpoint, ...)."""
    sharding = replicated_sharding(mesh)

    def put(x):
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                raise TypeError("replicate typed PRNG keys as jax.random.key_data(key)")
            if not x.is_fully_addressable:
                return jax.jit(lambda y: y, out_shardings=sharding)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def sync_flag(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (one small all-gather when
    there are several processes; free otherwise)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.any(flags))
