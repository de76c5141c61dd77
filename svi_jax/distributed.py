"""Multi-host setup: ``jax.distributed.initialize()`` from the environment, per-host input shards -> global arrays.

One process per host (TPU VM worker) or one per GPU (Slurm ``srun``). :func:`initialize` is a no-op for a single
process and otherwise lets ``jax.distributed.initialize()`` discover the cluster:

* TPU VMs (``launch/tpu_pod.sh``, which sets ``SVI_DISTRIBUTED=1``): the coordinator and process ids come from
  the TPU metadata, no other variables needed.
* Slurm (``launch/slurm_gpu.sbatch``): ``SLURM_*`` variables (JAX's Slurm cluster detection), one process per GPU.
* anything else: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (and optionally ``JAX_LOCAL_DEVICE_IDS``, comma-separated).

Each host's data loader yields ``batch_size / num_hosts`` examples (``svi_jax.data``: ``host_id``/``num_hosts``
default to ``jax.process_index()``/``jax.process_count()``); :func:`global_batch` assembles them into global arrays
split over ``data`` x ``fsdp`` without any host holding the global batch. Orbax checkpoints of sharded arrays are
multi-host as they are: every process writes its own shards (all processes must call save/restore); the data
loaders' states (one per host) are gathered into the checkpoint with :func:`gather_json`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np

log = logging.getLogger(__name__)

_initialized = False


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else None


def is_multiprocess_env(env=None) -> bool:
    """Does the environment describe more than one process (explicit JAX_* variables, Slurm, TPU pod worker)?"""
    env = os.environ if env is None else env
    if env.get("SVI_DISTRIBUTED", "") == "1":  # set by launch/tpu_pod.sh and launch/slurm_gpu.sbatch
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def initialize(force: bool = False) -> dict:
    """Start ``jax.distributed`` when the environment asks for several processes (or ``force``); idempotent.

    Returns ``{process_index, process_count, local_devices, devices}``.
    """
    global _initialized
    if not _initialized and (force or is_multiprocess_env()):
        kwargs = {}
        addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
        if addr:
            kwargs["coordinator_address"] = addr
            n, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
            if n is None or pid is None:
                raise RuntimeError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID")
            kwargs.update(num_processes=n, process_id=pid)
            ids = os.environ.get("JAX_LOCAL_DEVICE_IDS", "")
            if ids.strip():
                kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
        _cpu_collectives()
        jax.distributed.initialize(**kwargs)
        _initialized = True
        log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}


def _cpu_collectives() -> None:
    """Cross-process collectives of the CPU backend: gloo (over TCP, no extra install), unless one is chosen already
    (``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` / ``jax_cpu_collectives_implementation``). Without it a computation that
    spans the CPU devices of several processes fails ("Multiprocess computations aren't implemented on the CPU
    backend"); accelerators are unaffected. Must run before the backends are created."""
    if not jax.config.jax_cpu_collectives_implementation:   # None (older jax default): none across processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_main_process() -> bool:
    return jax.process_index() == 0


def global_batch(host_batch: dict, shardings) -> dict:
    """This host's slice of the batch (numpy / jax arrays, leading axis = this host's examples) -> global arrays
    with ``shardings`` (a matching tree of ``NamedSharding``; e.g. ``svi_jax.sharding.batch_specs``)."""
    def one(x, s):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        return jax.make_array_from_process_local_data(s, x)

    return jax.tree.map(one, host_batch, shardings)


def host_copy(tree: Any) -> Any:
    """A numpy copy of ``tree`` on every host (all-gathers arrays that span several processes)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def gather_json(obj: Any) -> list:
    """Every process's ``obj`` (JSON-able), in process order, on every process (``[obj]`` for one process).

    E.g. the data loaders' states: each host reads its own shard, so each has its own position and ``host_id``,
    and a checkpoint keeps them all (orbax writes JSON items from the primary host only)."""
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]


def sync(name: str = "svi_jax") -> None:
    """A barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
