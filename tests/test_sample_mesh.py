"""Sampling on a mesh (svi_jax/sample_mesh.py): ``python -m svi_jax.sample`` on 8 fake CPU devices (its default:
every local device; CFG branches over data=2, the tokens over context=4 with Ulysses attention, DiT weights sharded)
writes the same frames as the same generation on one device (uint8 max difference <= 2), and records the mesh and
the attention it ran in OUT.json."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from svi_jax import sample as S
from svi_jax import sample_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
from configs import tiny


def get_config():
    c = tiny.get_config()           # random tiny base (no checkpoint): every weight random, seeded
    c.model.update(dim=32, num_layers=2, num_heads=4, ffn_dim=64, freq_dim=32, text_len=16)
    c.encoders.t5.update(text_len=16, num_layers=1)
    c.encoders.clip.update(num_layers=1)
    c.data.update(num_frames=9, height=16, width=16)
    c.checkpoints.dit = ""
    return c
'''


def _load(path):
    spec = importlib.util.spec_from_file_location("sample_mesh_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_mesh_parsing_and_defaults():
    assert sample_mesh.parse_mesh("") is None and sample_mesh.parse_mesh("1") == {}
    assert sample_mesh.parse_mesh("data=2, context=4") == {"data": 2, "context": 4}
    with pytest.raises(ValueError, match="unknown axis"):
        sample_mesh.parse_mesh("seq=4")
    assert sample_mesh.default_sizes(8, guided=True) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert sample_mesh.default_sizes(8, guided=False)["context"] == 8
    assert sample_mesh.default_sizes(3, guided=True)["context"] == 3
    # the sequence axis needs sequence-parallel attention; fused kernels do Ulysses themselves; ring when heads
    # do not divide
    sizes = {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert sample_mesh.mesh_attention("auto", "cpu", sizes, 4) == "ulysses"
    assert sample_mesh.mesh_attention("auto", "cpu", sizes, 6) == "ring"
    assert sample_mesh.mesh_attention("auto", "tpu", sizes, 40) == "auto"
    assert sample_mesh.mesh_attention("auto", "tpu", dict(sizes, context=3), 40) == "ring"
    assert sample_mesh.mesh_attention("per_head", "cpu", sizes, 4) == "per_head"
    assert sample_mesh.mesh_attention("auto", "cpu", dict(sizes, context=1), 4) == "auto"


def test_eight_devices_give_the_single_device_frames(tmp_path):
    from PIL import Image

    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text(CONFIG)
    ref = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    out = str(tmp_path / "mesh.mp4")
    # cheaper XLA:CPU compiles (LLVM -O0, as tests/test_sharding.py): compile time dominates at this size
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    proc = subprocess.run([sys.executable, "-m", "svi_jax.sample", "--config", str(cfg_path), "--image",
                           str(tmp_path / "ref.png"), "--prompt", "a red ball", "--num_clips", "2", "--cycle_prompts",
                           "--num_steps", "2", "--out", out, "--lossless", "--noprogress"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    side = json.load(open(os.path.join(tmp_path, "mesh.json")))
    assert side["mesh"] == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert side["attention"] == "ulysses(flash)" and side["settings"]["cfg_batch"] is True
    got = S.Output(out).read_lossless()

    # the same generation on this process's one device (the in-memory rollout == the CLI's video, test_sample)
    config = _load(str(cfg_path))
    one = S.LongVideoSampler(config, num_steps=2, shift=float(config.erft.shift), cfg_scale=5.0)
    assert one.mesh is None
    want = one.rollout(S.load_image(str(tmp_path / "ref.png"), 16, 16), ["a red ball"] * 2, seed=0)
    assert got.shape == want.shape == (2 * 8 + 1, 16, 16, 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2, diff.max()
    assert want.std() > 5                      # a real picture, not a constant
