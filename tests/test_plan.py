"""svi_jax.plan compiles the trainer's own step: the same lowered program as the Trainer's on 8 fake devices, the
attention that 'auto' resolves to on the target, overrides recorded, and the memory of each remat policy."""
import json
import subprocess
import sys
from pathlib import Path

from tests.test_sharding import ROOT, _env

SMALL = ["--set", "model.num_layers=2", "--set", "model.dim=64", "--set", "model.num_heads=2",
         "--set", "model.ffn_dim=128", "--set", "model.text_dim=32", "--set", "model.text_len=16",
         "--set", "model.image_dim=32", "--set", "data.num_frames=9", "--set", "data.height=32",
         "--set", "data.width=32", "--set", "lora.rank=4", "--set", "erft.capacity=4"]


def test_plan_step_lowers_to_the_trainers_program_on_eight_devices():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "plan_identity_worker.py")], env=_env(8),
                          capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK identical" in proc.stdout


def _plan(tmp_path: Path, *extra):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "svi_jax.plan", "--config", str(ROOT / "configs" / "shot.py"), "--devices", "2",
           "--mesh", "data=2", "--json", str(out), *SMALL, *extra]
    proc = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_plan_reports_the_resolved_attention_and_each_remat_policy(tmp_path):
    r, text = _plan(tmp_path, "--inputs", "latents", "--remat-policies", "save_attention")   # next to 'full'
    assert r["inputs"] == "latents" and r["encoders"] is None and "encoders" not in r["per_device_gb"]["argument_parts"]
    # a CPU mesh of 2 devices: 'auto' is flash (per_head on one CPU device)
    assert r["model"]["attention_config"] == "auto" and r["model"]["attention"] == "flash"
    assert r["model"]["attention_override"] is None and "override" not in text
    pol = r["remat_policies"]
    assert r["model"]["remat_policy"] == "full" and set(pol) == {"save_attention"}
    assert pol["save_attention"]["peak"] > 0 and pol["save_attention"]["fits"]
    # saving the attention outputs: the backward skips the attention forward
    assert pol["save_attention"]["compiled_flops_per_device"] < r["flops"]["compiled_per_device"]
    assert "remat save_attention: peak" in text


def test_plan_attention_override_is_recorded(tmp_path):
    r, text = _plan(tmp_path, "--inputs", "latents", "--attention", "flash")
    assert r["model"]["attention"] == "flash" and r["model"]["attention_override"] == "flash"
    assert "attention flash (override --attention)" in text


SMALL_PIXELS = """
import ml_collections
from configs import shot


def get_config():
    c = shot.get_config()
    c.model.update(num_layers=2, dim=64, num_heads=2, ffn_dim=128, text_dim=32, text_len=16, image_dim=32)
    c.data.update(num_frames=9, height=32, width=32)
    c.lora.update(rank=4, alpha=4)
    c.erft.capacity = 4
    c.encoders.vae = ml_collections.ConfigDict(dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                                    temperal_downsample=[False, True, True]))
    c.encoders.t5 = ml_collections.ConfigDict(dict(vocab_size=258, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                                                   num_layers=2, num_buckets=8, max_distance=16, text_len=16))
    c.encoders.clip = ml_collections.ConfigDict(dict(image_size=28, patch_size=14, dim=32, mlp_dim=64, num_heads=2,
                                                     num_layers=2))
    return c
"""


def test_plan_counts_the_frozen_encoders_of_a_pixel_config(tmp_path):
    """Without a latent cache the trainer encodes pixels with the frozen encoders in their own program before the
    DiT step, so the plan does (by default): the encoders' params are an argument part, both programs are
    compiled, the peak is the larger of the two and the FLOPs are their sum."""
    cfg = tmp_path / "shot_small.py"
    cfg.write_text(SMALL_PIXELS)
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "svi_jax.plan", "--config", str(cfg), "--devices", "2", "--mesh", "data=2",
           "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["inputs"] == "pixels" and "frozen encoders, their own program before the DiT step" in proc.stdout
    pd = r["per_device_gb"]
    enc_gb = pd["argument_parts"]["encoders"]
    # tiny VAE + UMT5 (258 x 32 embedding, 2 layers) + CLIP: ~0.1-1 MB of float32 per device (replicated)
    assert 1e-5 < enc_gb < 1e-2
    e, fl = r["encoders"], r["flops"]
    assert 0 < e["flops_per_device"] < fl["compiled_per_device"]
    assert fl["compiled_encoders_per_device"] == e["flops_per_device"]
    assert fl["compiled_per_device"] == fl["compiled_dit_step_per_device"] + e["flops_per_device"]
    # the encoders' program beside the rest of the state; the DiT step beside the pixel batch; the peak is the max
    parts = pd["argument_parts"]
    resident = sum(v for k, v in parts.items() if k not in ("encoders", "batch", "inputs"))
    assert abs(e["peak_with_state"] - (e["peak"] + resident)) < 1e-9
    assert pd["peak"] == max(pd["peak_dit_step"], e["peak_with_state"])
    assert pd["peak_dit_step"] >= pd["arguments"] + pd["temporaries"] - pd["aliased"] + parts["batch"] - 1e-9
    assert 0 < parts["inputs"] < parts["batch"]   # latents + text/image tokens are smaller than the pixels


def test_sample_plan_lowers_to_the_samplers_program_on_four_devices(tmp_path):
    """``plan --sample`` compiles what ``python -m svi_jax.sample`` runs (same StableHLO on the default 4-device
    mesh), and its CLI reports the mesh, the resolved attention and the memory."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sample_plan_identity_worker.py")], env=_env(4),
                          capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK identical" in proc.stdout
    out = tmp_path / "sample_plan.json"
    proc = subprocess.run([sys.executable, "-m", "svi_jax.plan", "--sample", "--config", str(ROOT / "configs" / "tiny.py"),
                           "--devices", "4", "--num_steps", "2", "--json", str(out)], env=_env(1), capture_output=True,
                          text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "sample" and r["mesh"]["data"] == 2 and r["mesh"]["context"] == 2
    assert r["model"]["attention"] == "ulysses(flash)" and r["num_steps"] == 2
    m = r["memory_per_device_gb"]
    assert 0 < m["peak"] and m["arguments"] > 0 and r["fits"]
