"""Mesh, rules table, sharded ERFT train step, sequence-parallel attention, sampler, plan command.

The multi-device checks run in their own process with 8 fake CPU devices (tests/sharding_worker.py); the rest here
runs on the default single device.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from svi_jax import distributed, sharding
from svi_jax.plan import hlo_stats

ROOT = Path(__file__).resolve().parents[1]


def _env(devices: int):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    # cheaper XLA:CPU compiles (LLVM -O0): the programs here are tiny, compile time dominates
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}",
                                         "--xla_backend_optimization_level=0",
                                         "--xla_llvm_disable_expensive_passes=true"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_eight_fake_devices():
    """config.sharding.rules drives the trainer's shardings; attention (ulysses/ring == plain, with gradients),
    sampling and one ERFT train step on 4 meshes == 1 device."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_worker.py")], env=_env(8),
                          capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-5000:]
    for check in ("OK rules", "OK attention", "OK sample", "OK train {'data': 8}", "OK train {'data': 2, 'fsdp': 4}",
                  "OK train {'data': 2, 'fsdp': 2, 'context': 2}", "OK train {'data': 2, 'context': 2, 'tensor': 2}"):
        assert check in out, out[-3000:]


def test_plan_command_on_a_reduced_config(tmp_path):
    out = tmp_path / "plan.json"
    # --inputs latents: the reduced DiT widths do not match the full-size frozen encoders that pixel inputs
    # would put inside the step (tests/test_plan.py covers the pixel step with tiny encoders)
    sets = ["model.num_layers=2", "model.dim=64", "model.num_heads=2", "model.ffn_dim=128", "model.text_dim=32",
            "model.text_len=16", "model.image_dim=32", "data.num_frames=9", "data.height=64", "data.width=64",
            "lora.rank=4", "erft.capacity=6"]
    cmd = [sys.executable, "-m", "svi_jax.plan", "--config", str(ROOT / "configs" / "shot.py"), "--devices", "4",
           "--mesh", "data=2,fsdp=2", "--json", str(out), "--inputs", "latents"] + [f"--config.{s}" for s in sets]
    env = _env(1)  # the command must set its own device count
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "per device (GB)" in proc.stdout
    r = json.loads(out.read_text())
    assert r["devices"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "context": 1, "tensor": 1}
    assert r["batch"] == 4 and r["latent"] == [3, 8, 8, 16] and r["erft"]["bank_replicas"] == 2
    pd = r["per_device_gb"]
    # the banks are donated and updated in place: output aliased to the input, no bank-sized temporaries
    bank = pd["argument_parts"]["banks"]
    assert bank > 0 and pd["aliased"] >= 0.99 * bank and pd["temporaries"] < 2 * pd["arguments"] + 0.01
    # one replica's 2 x 50 x 6 bf16 entries of [3, 8, 8, 16], split over the replica's 2 fsdp devices
    assert bank * 1e9 == pytest.approx(2 * 50 * 6 * 3 * 8 * 8 * 16 * 2 / 2 + 2 * 50 * 4, rel=1e-6)
    # small dims: the analytic LoRA/embedding terms are coarse here (at 14B size the ratio is 0.97-1.0)
    assert 0.6 < r["flops"]["compiled_over_analytic_step"] < 1.4
    assert r["compile_s"] > 0 and r["fits"]


# ------------------------------------------------------------------------------------------------ single device


def test_mesh_shape_resolves_the_rest_and_rejects_bad_meshes():
    assert sharding.mesh_shape({"data": -1, "fsdp": 8}, 64) == {"data": 8, "fsdp": 8, "context": 1, "tensor": 1}
    assert sharding.mesh_shape({"data": 2, "context": -1}, 8)["context"] == 4
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="16 devices"):
        sharding.mesh_shape({"data": 4, "fsdp": 4}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"pipeline": 2}, 2)
    mesh = sharding.make_mesh({"data": -1})
    assert mesh.axis_names == sharding.MESH_AXES and mesh.size == jax.device_count()


class _FakeMesh:
    def __init__(self, **sizes):
        self.shape = {a: sizes.get(a, 1) for a in sharding.MESH_AXES}


def test_rules_table_places_dit_encoder_and_activation_axes():
    m = _FakeMesh(data=2, fsdp=4, context=2, tensor=2)
    spec = lambda names, shape: sharding.logical_to_spec(names, shape, m)  # noqa: E731
    # weights: width over fsdp (and the context devices: ZeRO-3 over fsdp x context), heads/FFN over tensor
    assert spec(("layers", "embed", "heads"), (40, 5120, 5120)) == P(None, ("fsdp", "context"), "tensor")
    assert spec(("layers", "mlp", "embed"), (40, 13824, 5120)) == P(None, "tensor", ("fsdp", "context"))
    assert spec(("kv", "embed"), (4096, 5120)) == P(None, ("fsdp", "context"))  # embed wins, kv stays whole
    assert spec(("kv", "mlp"), (1280, 1280)) == P("fsdp", "tensor")
    assert spec(("vocab", "embed"), (256384, 4096)) == P("tensor", ("fsdp", "context"))
    assert spec(("activation_batch", "activation_length", "activation_heads"), (8, 32760, 5120)) == \
        P(("data", "fsdp"), "context", "tensor")
    # an encoder activation: 'batch' takes fsdp before 'embed' can
    assert spec(("batch", "length", "embed"), (8, 512, 4096)) == P(("data", "fsdp"), "context", None)
    # fitting: axes that do not divide a dimension are dropped (batch 2 over data x fsdp = 8)
    assert spec(("activation_batch", "activation_length", "activation_embed"), (2, 75, 64)) == P("data", None, None)


def test_bank_specs_split_entries_within_a_replica_or_over_all_devices():
    from svi_jax import erft
    from svi_jax.erft import sharded

    m = _FakeMesh(data=8, fsdp=8)
    one = jax.eval_shape(lambda: erft.init_banks((21, 60, 104, 16), 50, 500))
    rep = jax.tree.map(lambda a: jax.ShapeDtypeStruct((8 * a.shape[0],) + a.shape[1:], a.dtype), one)
    s = sharded.bank_specs(rep, m, num_grids=50)["noise"]  # 8 replicas x 50 grids, replica-major
    assert s.errors == P("data", None, None, None, None, "fsdp") and s.count == P("data")
    g = sharded.bank_specs(one, m, num_grids=50)["latent"]  # global: data on channels (16/8), fsdp on width
    assert g.errors == P(None, None, None, None, "fsdp", "data")


def test_replica_banks_vmap_path_matches_per_replica_erft(monkeypatch):
    """On one device the per-replica banks run as a vmap: replica r sees examples r*B/R.. and only its banks."""
    import ml_collections

    from svi_jax import erft
    from svi_jax.erft import sharded

    cfg = ml_collections.ConfigDict(dict(erft=dict(bank_mode="replica", bank_replicas=2, num_grids=50, capacity=3),
                                         mesh=dict(data=1)))
    banks = sharded.init_banks(cfg, (2, 2, 2, 4), dtype=jnp.float32)
    assert banks["noise"].errors.shape == (100, 3, 2, 2, 2, 4)  # replica-major [R * G, K, ...]
    ecfg = erft.erft_config(p_insert_clean=1.0, warmup_steps=0, num_grids=50)
    k = jax.random.split(jax.random.key(0), 3)
    v, tg = jax.random.normal(k[0], (4, 2, 2, 2, 4)), jax.random.normal(k[1], (4, 2, 2, 2, 4))
    t = jnp.array([999.0, 500.0, 999.0, 10.0])
    sigma = t / 1000
    out = sharded.curate(k[2], banks, t, sigma, v, tg, {"clean": jnp.zeros(4)}, jnp.int32(5), ecfg)
    keys = jax.random.split(k[2], 2)
    for r in range(2):
        rows = lambda tree: jax.tree.map(lambda a: a[50 * r:50 * (r + 1)], tree)  # noqa: E731
        one = rows(banks)
        sl = slice(2 * r, 2 * r + 2)
        want = erft.curate(keys[r], one, t[sl], sigma[sl], v[sl], tg[sl], {"clean": jnp.zeros(2)}, 5, ecfg)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(rows(out))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(out["noise"].count.sum()) == 4


def test_hlo_stats_multiplies_loop_bodies_by_their_trip_count():
    def f(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    for n in (1, 5):
        compiled = jax.jit(f).lower(x, jax.ShapeDtypeStruct((n, 64, 64), jnp.float32)).compile()
        assert hlo_stats(compiled.as_text())["flops"] == 2 * 64 ** 3 * n


def test_multiprocess_environment_detection():
    assert not distributed.is_multiprocess_env({})
    assert distributed.is_multiprocess_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert distributed.is_multiprocess_env({"SLURM_NTASKS": "8"})
    assert not distributed.is_multiprocess_env({"SLURM_NTASKS": "1"})
    assert distributed.is_multiprocess_env({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    info = distributed.initialize()  # single process here: a no-op
    assert info["process_count"] == 1


def test_sharding_imports_nothing_from_svi_jax_and_erft_no_data_or_train():
    """The layering rules: sharding knows meshes only; erft never imports the data or the trainer (function-level
    imports included)."""
    import ast

    def imports(path):
        out = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                out.add(("." * n.level) + (n.module or ""))
        return out

    pkg = ROOT / "svi_jax"
    assert not {m for m in imports(pkg / "sharding.py") if m.startswith(("svi_jax", "."))}
    for f in (pkg / "erft").glob("*.py"):
        bad = {m for m in imports(f) if m.startswith(("svi_jax.data", "svi_jax.train", "svi_jax.pipeline"))}
        assert not bad, (f.name, bad)
