"""Gradients against independent references: the DiT's LoRA gradients vs torch autograd (diffusers + PEFT) on a
tiny I2V model, and every attention implementation's gradients vs ``xla`` (a plain softmax attention) on small
shapes, including several and ragged flash blocks."""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.torch_ref import ROOT, max_rel_err

sys.path.insert(0, ROOT)


def test_dit_lora_grads_match_torch_autograd(tmp_path):
    """Loss and every LoRA gradient of the tiny I2V DiT (all weights random, LoRA A and B random, alpha != rank)
    against diffusers + PEFT in torch: the parity ``bench/dit_bench.py`` checks before timing, here as a unit test."""
    import torch

    import svi_jax
    from bench import dit_bench
    from svi_jax.convert.dit import convert
    from svi_jax.models.dit import WanDiT
    from tests.torch_ref import tiny_wan_diffusers

    model = tiny_wan_diffusers(i2v=True, seed=3, num_layers=2, heads=2, head_dim=8, in_channels=9)
    model.save_pretrained(str(tmp_path / "ref"), safe_serialization=True)
    convert(str(tmp_path / "ref"), str(tmp_path / "ours"), show_progress=False)
    dit = svi_jax.load(str(tmp_path / "ours"))
    rank, alpha = 4, 8
    lora, mapping = dit_bench.attach_lora(model, dit.params, rank)
    # PEFT as with lora_alpha = alpha: scaling alpha / rank on every target, as our training's lora_scale
    scaled = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    for m in scaled:
        m.scaling["default"] = alpha / rank
    assert len(scaled) == 10 * 2
    r = np.random.RandomState(0)
    x = r.randn(1, 3, 4, 6, 4).astype(np.float32)
    y = r.randn(1, 3, 4, 6, 5).astype(np.float32)
    ctx = r.randn(1, 512, 20).astype(np.float32)
    clip = r.randn(1, 257, 20).astype(np.float32)
    target = r.randn(1, 3, 4, 6, 4).astype(np.float32)
    t = np.array([611.0], np.float32)

    out = model(hidden_states=torch.from_numpy(np.concatenate([x, y], -1)).permute(0, 4, 1, 2, 3),
                timestep=torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                encoder_hidden_states_image=torch.from_numpy(clip), return_dict=False)[0]
    loss_t = torch.mean(torch.square(out - torch.from_numpy(target).permute(0, 4, 1, 2, 3)))
    loss_t.backward()

    module = WanDiT(dataclasses.replace(dit.config, lora_scale=alpha / rank))

    def loss_fn(lo):
        v = module.apply({"params": dit.params, "lora": lo}, x, t, ctx, clip_fea=clip, y=y)
        return jnp.mean(jnp.square(v - target))

    loss_j, grads = jax.jit(jax.value_and_grad(loss_fn))(lora)
    check = dit_bench.parity((loss_j, grads), loss_t.detach(), model, mapping)
    print(f"DiT LoRA grads vs torch autograd: loss rel err {check['loss_rel_err']:.2e}, "
          f"max grad rel err {check['lora_grad_max_rel_err']:.2e}")
    assert len(mapping) == 2 * 10 * 2                     # A and B of 10 targets in 2 blocks, all compared
    assert check["loss_rel_err"] < 1e-5 and check["lora_grad_max_rel_err"] < 1e-4


def _qkv(b, lq, lk, h, d, seed):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (b, lq, h, d)), jax.random.normal(k[1], (b, lk, h, d)),
            jax.random.normal(k[2], (b, lk, h, d)), jax.random.normal(k[3], (b, lq, h, d)))


def _grads(fn, q, k, v, g):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * g), (0, 1, 2)))(q, k, v)


def _xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@pytest.mark.parametrize("lq,lk", [(7, 7), (12, 21)])
def test_per_head_attention_grads_match_xla(lq, lk):
    from svi_jax.models.layers import attention

    q, k, v, g = _qkv(2, lq, lk, 3, 8, seed=lq)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, "per_head")), np.asarray(_xla(q, k, v)),
                               rtol=1e-5, atol=1e-5)
    for ours, ref in zip(_grads(lambda q, k, v: attention(q, k, v, "per_head"), q, k, v, g), _grads(_xla, q, k, v, g)):
        assert max_rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("lq,lk,bq,bk", [(16, 16, 4, 8), (13, 22, 5, 4)])   # several blocks; ragged tails
def test_flash_attention_grads_match_xla_with_several_and_ragged_blocks(lq, lk, bq, bk):
    from svi_jax.models import attention_parallel as ap

    q, k, v, g = _qkv(2, lq, lk, 2, 8, seed=lq + lk)
    fl = lambda q, k, v: ap.flash_attention(q, k, v, block_q=bq, block_k=bk)  # noqa: E731
    np.testing.assert_allclose(np.asarray(fl(q, k, v)), np.asarray(_xla(q, k, v)), rtol=1e-5, atol=1e-5)
    for ours, ref in zip(_grads(fl, q, k, v, g), _grads(_xla, q, k, v, g)):
        assert max_rel_err(ours, ref) < 1e-5
    # only the first kv_len keys: the same as xla on the truncated keys, zero gradient on the rest
    n = lk - 3
    fk = lambda q, k, v: ap.flash_attention(q, k, v, block_q=bq, block_k=bk, kv_len=n)  # noqa: E731
    gq, gk, gv = _grads(fk, q, k, v, g)
    rq, rk, rv = _grads(_xla, q, k[:, :n], v[:, :n], g)
    assert max_rel_err(gq, rq) < 1e-5 and max_rel_err(gk[:, :n], rk) < 1e-5 and max_rel_err(gv[:, :n], rv) < 1e-5
    assert float(jnp.abs(gk[:, n:]).max()) == 0.0 and float(jnp.abs(gv[:, n:]).max()) == 0.0
