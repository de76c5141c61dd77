"""Multi-host training really run: 2 processes x 4 fake CPU devices on localhost (jax.distributed, gloo CPU
collectives), started by the launch scripts themselves, per-host data shards, orbax checkpoints written by both
processes, SIGKILL of both mid-run and resume.

* reference: ``launch/slurm_gpu.sbatch`` run by bash with a stand-in ``srun`` (tests/multihost_bin/srun: one task
  per process with ``SLURM_PROCID``/``SLURM_LOCALID``), so ``svi_jax.distributed.initialize`` goes through
  ``SVI_DISTRIBUTED=1`` and JAX's Slurm cluster detection (coordinator from ``SLURM_STEP_NODELIST`` and the job id);
  the script's own mesh/batch arithmetic (``data=$NODES``, ``fsdp=$GPUS_PER_NODE``) makes the run's layout.
* killed + resumed: ``launch/tpu_pod.sh run`` with a stand-in ``gcloud`` (tests/multihost_bin/gcloud: each "worker"
  gets ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` as the TPU metadata would give them),
  so the same command line and ``SVI_DISTRIBUTED=1``/``LIBTPU_INIT_ARGS`` handling as on a pod.
* one process with 8 devices: ``python -m svi_jax.train`` on the same mesh and global batch.

Per-step losses: killed+resumed == uninterrupted 2-process run (exactly), == one process (float tolerance).
A shrunken tiny config (random base, 1 layer, 16x16 pixels) and a shared persistent compilation cache keep it cheap.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "tests", "multihost_bin")
STEPS, PAUSE_AT = 4, 2
# the tiny config shrunk to what the test needs (one compiled program per layout, a few cheap steps)
SMALL = ["--config.checkpoints.dit=", "--config.model.num_layers=1", "--config.model.dim=32",
         "--config.model.num_heads=2", "--config.model.ffn_dim=64", "--config.model.freq_dim=32",
         "--config.data.num_frames=13", "--config.data.height=16", "--config.data.width=16", "--config.lora.rank=2",
         "--config.erft.capacity=2", f"--config.train.num_steps={STEPS}", f"--config.train.ckpt_every={PAUSE_AT}",
         "--config.data.num_workers=0"]
# what launch/slurm_gpu.sbatch makes of 2 nodes x 4 devices: data=2 x fsdp=4, global batch 8
LAYOUT = ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.data.batch_size=8"]


def _free_port(lo: int = 20000, hi: int = 60000) -> int:
    rng = np.random.default_rng()
    for _ in range(200):
        port = int(rng.integers(lo, hi))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from svi_jax.data import builder, synthetic

    d = tmp_path_factory.mktemp("multihost")
    synthetic.write_dataset(str(d / "videos"), num_videos=8, num_frames=17, height=24, width=32, seed=5)
    builder.build_dataset(str(d / "videos"), str(d / "dataset"), progress=False)
    env = dict(os.environ)
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               PATH=os.pathsep.join([BIN, os.path.dirname(sys.executable), env.get("PATH", "")]),
               # every run compiles the same programs: share them (process 0 writes, every process reads)
               JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "SVI_DISTRIBUTED", "TPU_WORKER_HOSTNAMES"):
        env.pop(k, None)
    return d, str(d / "dataset"), env


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if "step" in r]


def _header(workdir):
    return json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())["header"]


def _train_args(workdir, dataset):
    return ["--config", "configs/tiny.py", "--workdir", workdir, f"--config.data.dataset={dataset}", *SMALL]


def _slurm(workdir, dataset, env):
    """launch/slurm_gpu.sbatch as Slurm would run it on 2 nodes x 4 devices (one task per node here)."""
    port = _free_port(61440, 65536)            # JAX's Slurm detection: port = 61440 + job id % 4096
    e = dict(env, SLURM_JOB_ID=str(port - 61440 + 4096 * 7), SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2",
             SLURM_STEP_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=ROOT, GPUS_PER_NODE="4", CONFIG="configs/tiny.py",
             WORKDIR=workdir, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             EXTRA=" ".join([f"--config.data.dataset={dataset}", *SMALL]))
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch")], env=e, capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def _tpu_env(env, home):
    return dict(env, FAKE_TPU_WORKERS="2", FAKE_TPU_PORT=str(_free_port()), FAKE_TPU_HOME=home, DIR=ROOT,
                XLA_FLAGS="--xla_force_host_platform_device_count=4")


def _tpu_logs(home):
    out = []
    for w in sorted(os.listdir(home)):
        for f in os.listdir(os.path.join(home, w)):
            out.append(open(os.path.join(home, w, f)).read()[-3000:])
    return "\n".join(out)


def test_two_processes_train_kill_resume_and_match_one_process(setup, tmp_path):
    d, dataset, env = setup
    t0 = time.time()
    ref = str(tmp_path / "ref")
    r = _slurm(ref, dataset, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "process 0 of 2, 4 local / 8 global devices" in r.stderr and "process 1 of 2" in r.stderr
    want = _losses(ref)
    assert [s for s, _ in want] == list(range(1, STEPS + 1)) and all(np.isfinite(v) for _, v in want)
    assert _header(ref)["processes"] == 2 and _header(ref)["mesh"]["data"] == 2 and _header(ref)["mesh"]["fsdp"] == 4
    t_ref = time.time() - t0

    # the same run through launch/tpu_pod.sh, both processes SIGKILLed right after step PAUSE_AT's checkpoint
    run, home = str(tmp_path / "killed"), str(tmp_path / "home")
    marker = str(tmp_path / "paused")
    args = _train_args(run, dataset) + LAYOUT
    p = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "run", sys.executable,
                          "tests/train_pause.py", str(PAUSE_AT), marker, *args], env=_tpu_env(env, home),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not all(os.path.exists(f"{marker}.{i}") for i in range(2)):
            assert p.poll() is None, _tpu_logs(home)
            assert time.time() < deadline, "the 2-process run never reached step %d\n%s" % (PAUSE_AT, _tpu_logs(home))
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)      # both workers (and the launcher) at once, no clean-up
        p.wait()
    assert not os.path.exists(os.path.join(run, "lora.safetensors"))
    # orbax: each process wrote its own shards of the step's state
    state_dir = os.path.join(run, "checkpoints", str(PAUSE_AT), "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir)), os.listdir(state_dir)
    t_kill = time.time() - t0 - t_ref

    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "run", sys.executable, "-m",
                        "svi_jax.train", *args], env=_tpu_env(env, home), capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    logs = _tpu_logs(home)
    assert r.returncode == 0, logs
    assert logs.count(f"resumed from step {PAUSE_AT}") >= 2, logs      # both processes restored
    assert _losses(run) == want                                        # bit for bit the uninterrupted run
    t_resume = time.time() - t0 - t_ref - t_kill

    # one process, 8 devices, same mesh and global batch
    one = str(tmp_path / "one")
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-m", "svi_jax.train", *_train_args(one, dataset), *LAYOUT], env=e,
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    got = _losses(one)
    assert _header(one)["processes"] == 1 and [s for s, _ in got] == [s for s, _ in want]
    diff = max(abs(a - b) / max(abs(b), 1e-12) for (_, a), (_, b) in zip(got, want))
    print(f"2 processes vs 1: max rel loss diff {diff:.2e}; wall: ref {t_ref:.0f}s, killed {t_kill:.0f}s, "
          f"resumed {t_resume:.0f}s, one process {time.time() - t0 - t_ref - t_kill - t_resume:.0f}s")
    assert diff <= 1e-5, (got, want)
