"""Fused attention kernels: Pallas splash attention (interpret mode on CPU) against a float64 NumPy reference,
the backend resolver, and the DiT with ``attention='splash'`` against ``per_head``.

The multi-device checks (splash under ``shard_map`` on 4 fake devices, context 2 x tensor 2) run in their own
process (tests/attention_kernels_worker.py)."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svi_jax.models import attention_kernels as ak
from svi_jax.models import layers
from svi_jax.models.layers import attention, resolve_attention

ROOT = Path(__file__).resolve().parents[1]


def reference(q, k, v, w):
    """float64 softmax attention and the gradients of ``sum(o * w)`` w.r.t. q, k, v (written out by hand)."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    scale = 1.0 / np.sqrt(q.shape[-1])
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v)
    dv = np.einsum("bhqk,bqhd->bkhd", p, w)
    dp = np.einsum("bqhd,bkhd->bhqk", w, v)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    return o, (dq, dk, dv)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def inputs(lq, lk, heads=2, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (2, lq, heads, d))
    k = jax.random.normal(ks[1], (2, lk, heads, d))
    v = jax.random.normal(ks[2], (2, lk, heads, d))
    w = jax.random.normal(ks[3], q.shape)
    return q, k, v, w


@pytest.mark.parametrize("lq,lk", [(45, 45), (1950, 1950), (45, 257), (300, 512)],
                         ids=["self45", "self1950", "cross257", "cross512"])
def test_splash_interpret_matches_float64_reference(lq, lk):
    q, k, v, w = inputs(lq, lk)
    f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(ak.splash_attention(q, k, v, interpret=True) * w),
                                   argnums=(0, 1, 2)))
    o = jax.jit(lambda q, k, v: ak.splash_attention(q, k, v, interpret=True))(q, k, v)
    _, grads = f(q, k, v)
    o_ref, g_ref = reference(q, k, v, w)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert rel(o, o_ref) <= 1e-5
    for name, g, r in zip("qkv", grads, g_ref):
        assert rel(g, r) <= 1e-5, name


def test_splash_padding_keys_do_not_change_the_result():
    """257 image keys padded to a 384 block, or the same keys with 127 explicit padding rows masked by kv_len:
    the same numbers as attention over exactly the 257 keys (no weight on padding)."""
    q, k, v, w = inputs(45, 257, seed=3)
    o = ak.splash_attention(q, k, v, interpret=True)
    junk = jax.random.normal(jax.random.key(9), (2, 127, 2, 16)) * 50.0
    kp, vp = jnp.concatenate([k, junk], 1), jnp.concatenate([v, junk], 1)
    o_pad = ak.splash_attention(q, kp, vp, kv_len=257, interpret=True)
    o_ref, _ = reference(q, k, v, w)
    assert rel(o, o_ref) <= 1e-5 and rel(o_pad, o_ref) <= 1e-5


def test_splash_block_sizes():
    assert ak.splash_block(32760, 512) == 512          # 64 blocks, 8 padded keys
    assert ak.splash_block(257, 512) == 384            # one block of 3 x 128
    assert ak.splash_block(512, 512) == 512
    assert ak.splash_block(45, 512) == 128
    assert ak.splash_block(1950, 300) == 384           # rounded to the 128-lane width


@pytest.mark.parametrize("platform,want", [("tpu", "splash"), ("gpu", "cudnn"), ("cpu", "per_head")])
def test_resolver_picks_the_backend_kernel(monkeypatch, platform, want):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert resolve_attention("auto") == want
    assert resolve_attention("auto", platform) == want
    assert resolve_attention("xla") == "xla"          # explicit choices stay as they are
    assert resolve_attention("auto", platform, 8) == {"cpu": "flash"}.get(platform, want)  # a mesh of 8
    assert ak.backend_kernel() == {"tpu": "splash", "gpu": "cudnn", "cpu": "flash"}[platform]


def test_resolver_rejects_unknown_names():
    with pytest.raises(ValueError, match="splash"):
        resolve_attention("fused")


def test_xla_above_the_token_count_warns_with_the_score_matrix_size(monkeypatch, caplog):
    monkeypatch.setattr(layers, "XLA_WARN_TOKENS", 40)
    q, k, v, _ = inputs(45, 45)
    with caplog.at_level("WARNING", logger="svi_jax.models.layers"):
        jax.eval_shape(lambda q, k, v: attention(q, k, v, "xla"), q, k, v)
    assert "[2, 2, 45, 45] float32 score matrix" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="svi_jax.models.layers"):
        jax.eval_shape(lambda q, k, v: attention(q, k, v, "per_head"), q, k, v)
    assert "score matrix" not in caplog.text


def test_cudnn_wrapper_casts_to_bf16_and_masks_padded_keys(monkeypatch):
    """No GPU here: the cuDNN call is replaced by the XLA implementation with the same arguments, to check what
    the wrapper passes (bf16 operands, key lengths for padding, the output back in the input dtype)."""
    seen = {}
    real = jax.nn.dot_product_attention

    def fake(q, k, v, *, scale, key_value_seq_lengths, implementation):
        seen.update(dtype=q.dtype, impl=implementation, lengths=key_value_seq_lengths)
        return real(q, k, v, scale=scale, key_value_seq_lengths=key_value_seq_lengths, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v, w = inputs(45, 30)
    junk = jnp.full((2, 10, 2, 16), 30.0)
    o = ak.cudnn_attention(q, jnp.concatenate([k, junk], 1), jnp.concatenate([v, junk], 1), kv_len=30)
    assert seen["impl"] == "cudnn" and seen["dtype"] == jnp.bfloat16 and o.dtype == jnp.float32
    assert np.asarray(seen["lengths"]).tolist() == [30, 30]
    o_ref, _ = reference(q, k, v, w)
    assert rel(o, o_ref) < 2e-2                      # bf16 compute


def test_dit_with_splash_equals_per_head_values_and_lora_grads():
    from svi_jax import lora as lora_lib
    from svi_jax.models.dit import DiTConfig, WanDiT, init_params

    base = dict(model_type="t2v", dim=32, num_layers=2, num_heads=2, ffn_dim=48, freq_dim=16, text_dim=16,
                text_len=8, in_dim=4, out_dim=4, remat_policy="none")
    cfg = DiTConfig.from_dict(base)
    params = init_params(cfg, jax.random.key(0))
    lora = lora_lib.init_lora(params, jax.random.key(1), 4)
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), lora)
    ks = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(ks[0], (2, 3, 6, 8, cfg.out_dim))
    t = jnp.array([300.0, 700.0])
    ctx = jax.random.normal(ks[1], (2, 7, cfg.text_dim))
    clip = jax.random.normal(ks[2], (2, 257, cfg.image_dim)) if cfg.is_i2v else None
    y = jax.random.normal(ks[3], x.shape[:-1] + (cfg.in_dim - cfg.out_dim,)) if cfg.is_i2v else None

    def run(impl):
        m = WanDiT(DiTConfig.from_dict(dict(base, attention=impl)))

        def loss(lo):
            out = m.apply({"params": params, "lora": lo}, x, t, ctx, clip_fea=clip, y=y)
            return jnp.mean(out ** 2), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

    (l1, o1), g1 = run("splash")
    (l0, o0), g0 = run("per_head")
    assert rel(o1, np.asarray(o0, np.float64)) <= 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert rel(a, np.asarray(b, np.float64)) <= 1e-5


def test_splash_under_shard_map_on_four_fake_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "attention_kernels_worker.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK splash-mesh" in proc.stdout
