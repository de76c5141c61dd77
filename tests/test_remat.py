"""Named remat policies of the DiT (svi_jax.models.remat): 'save_attention' keeps the attention outputs and the
attention VJPs' residuals, so the backward does not run the attention forward again."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svi_jax import lora as lora_lib
from svi_jax.models import remat
from svi_jax.models.dit import DiTConfig, WanDiT, init_params
from svi_jax.plan import hlo_stats

BASE = dict(model_type="t2v", dim=32, num_layers=2, num_heads=2, ffn_dim=48, freq_dim=16, text_dim=16, text_len=8,
            in_dim=4, out_dim=4, attention="per_head")
X = jnp.linspace(-1, 1, 2 * 16 * 16 * 4).reshape(1, 2, 16, 16, 4)
T, CTX = jnp.array([300.0]), jnp.linspace(-1, 1, 8 * 16).reshape(1, 8, 16)


def grad_fn(policy):
    cfg = DiTConfig.from_dict(dict(BASE, remat_policy=policy))
    params = init_params(cfg, jax.random.key(0))
    lora = jax.tree.map(lambda a: a + 0.1, lora_lib.init_lora(params, jax.random.key(1), 4))
    m = WanDiT(cfg)
    f = jax.jit(jax.grad(lambda lo: jnp.mean(m.apply({"params": params, "lora": lo}, X, T, CTX) ** 2)))
    return f, lora


def test_save_attention_skips_exactly_the_attention_forward_in_the_backward():
    (f_full, lora), (f_save, _) = grad_fn("full"), grad_fn("save_attention")
    f_full, f_save = f_full.lower(lora).compile(), f_save.lower(lora).compile()
    flops = {n: hlo_stats(f.as_text())["flops"] for n, f in (("full", f_full), ("save", f_save))}
    n, d, L = 2 * 8 * 8, 32, 2                          # tokens, width, layers
    attn_fwd = L * (2 * 2 * n * n * d + 2 * 2 * n * 8 * d)  # QK^T + PV, self (n keys) and cross (8 text keys)
    assert flops["full"] - flops["save"] == pytest.approx(attn_fwd, rel=0.01)
    for a, b in zip(jax.tree.leaves(f_full(lora)), jax.tree.leaves(f_save(lora))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_offload_policy_builds_and_matches(monkeypatch):
    f, lora = grad_fn("offload_attention")
    g_full, _ = grad_fn("full")
    for a, b in zip(jax.tree.leaves(f(lora)), jax.tree.leaves(g_full(lora))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(remat, "has_pinned_host", lambda: False)   # e.g. a backend without host memory spaces
    assert remat.checkpoint_policy("offload_attention") is not None


def test_unknown_policy_is_rejected_naming_the_choices():
    with pytest.raises(ValueError, match="save_attention"):
        DiTConfig.from_dict(dict(BASE, remat_policy="attention"))
