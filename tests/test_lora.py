"""LoRA: functional application, merge/unmerge, SVI-format import/export, parity of the official merge."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svi_jax
from svi_jax import lora as L
from svi_jax.model_dirs import flatten
from svi_jax.models.dit import DiTConfig, WanDiT, init_params
from tests.torch_ref import max_rel_err

CFG = DiTConfig(model_type="i2v", dim=24, num_layers=2, num_heads=2, ffn_dim=40, freq_dim=16, text_dim=20, text_len=8,
                in_dim=9, out_dim=4, image_dim=20)


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (2, 3, 4, 6, 4)), jnp.array([20.0, 800.0]), jax.random.normal(k[1], (2, 5, 20)),
            jax.random.normal(k[2], (2, 257, 20)), jax.random.normal(k[3], (2, 3, 4, 6, 5)))


def _rand_params(seed=0):
    params = init_params(CFG, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    ks = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])


def _random_lora(params, rank=4, seed=1):
    lora = L.init_lora(params, jax.random.key(seed), rank)
    leaves, tree = jax.tree.flatten(lora)
    ks = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])


def test_targets_are_the_official_list():
    params = init_params(CFG, jax.random.key(0))
    paths = L.target_paths(params)
    assert "blocks/self_attn/q" in paths and "blocks/cross_attn/o" in paths and "blocks/ffn/2" in paths
    assert not any("k_img" in p or "v_img" in p or "text_embedding" in p for p in paths)
    assert len(paths) == 10   # q k v o x (self, cross) + ffn.0, ffn.2


def test_peft_kaiming_init():
    params = init_params(CFG, jax.random.key(0))
    lora = L.init_lora(params, jax.random.key(3), rank=8)
    a = np.asarray(lora["blocks"]["ffn"]["2"]["a"])   # in = ffn_dim 40
    # PEFT: nn.init.kaiming_uniform_(lora_A.weight [r, in], a=sqrt(5)): U(-bound, bound) with torch's formula
    import math

    import torch

    bound = math.sqrt(3.0) * torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(40)
    assert a.shape == (2, 40, 8) and abs(bound - 1 / np.sqrt(40)) < 1e-12
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound          # fills the interval
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3) and abs(a.mean()) < 0.1 * bound
    assert not np.array_equal(a[0], a[1])                                        # each block its own draw
    q = np.asarray(lora["blocks"]["self_attn"]["q"]["a"])
    assert q.shape == (2, 24, 8) and np.abs(q).max() > 0.95 / np.sqrt(24)       # bound by each kernel's fan-in
    assert not np.allclose(q[0, :8], a[0, :8])
    assert float(jnp.abs(lora["blocks"]["ffn"]["2"]["b"]).max()) == 0.0


def test_merged_equals_unmerged_and_unmerge_restores():
    params = _rand_params()
    lora = _random_lora(params)
    x, t, ctx, clip, y = _inputs()
    scale = 0.75
    cfg = dataclasses.replace(CFG, lora_scale=scale)
    unmerged = WanDiT(cfg).apply({"params": params, "lora": lora}, x, t, ctx, clip_fea=clip, y=y)
    merged_params = L.merge(params, lora, scale)
    merged = WanDiT(CFG).apply({"params": merged_params}, x, t, ctx, clip_fea=clip, y=y)
    base = WanDiT(CFG).apply({"params": params}, x, t, ctx, clip_fea=clip, y=y)
    assert max_rel_err(merged, base) > 1e-2          # the LoRA does something
    assert max_rel_err(merged, unmerged) < 1e-5
    restored = L.unmerge(merged_params, lora, scale)
    for k, v in flatten(params).items():
        np.testing.assert_allclose(np.asarray(flatten(restored)[k]), np.asarray(v), atol=1e-5)


def test_grads_reach_lora_only():
    params = _rand_params(1)
    lora = _random_lora(params)
    x, t, ctx, clip, y = _inputs()

    def loss(lo):
        return jnp.mean(WanDiT(CFG).apply({"params": params, "lora": lo}, x, t, ctx, clip_fea=clip, y=y) ** 2)

    g = jax.grad(loss)(lora)
    assert jax.tree.structure(g) == jax.tree.structure(lora)
    assert all(float(jnp.linalg.norm(v)) > 0 for v in jax.tree.leaves(g))


def test_custom_vjp_matches_autodiff():
    from svi_jax.models.layers import lora_matmul

    k = jax.random.split(jax.random.key(0), 4)
    x, a, b = jax.random.normal(k[0], (2, 7, 5)), jax.random.normal(k[1], (5, 3)), jax.random.normal(k[2], (3, 6))
    g = jax.random.normal(k[3], (2, 7, 6))
    f1 = lambda x, a, b: jnp.sum(lora_matmul(x, a, b, 0.5) * g)  # noqa: E731
    f2 = lambda x, a, b: jnp.sum(((x @ a) @ b) * 0.5 * g)  # noqa: E731
    for u, v in zip(jax.grad(f1, (0, 1, 2))(x, a, b), jax.grad(f2, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5)


def test_gelu_tanh_matches_jax_gelu_values_and_grads():
    from svi_jax.models.layers import gelu_tanh

    x = jnp.linspace(-6.0, 6.0, 1001).reshape(7, 143) * jax.random.uniform(jax.random.key(1), (7, 143), minval=0.5)
    np.testing.assert_array_equal(np.asarray(gelu_tanh(x)), np.asarray(jax.nn.gelu(x, approximate=True)))
    g = jax.random.normal(jax.random.key(2), x.shape)
    d1 = jax.grad(lambda x: jnp.sum(gelu_tanh(x) * g))(x)
    d2 = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True) * g))(x)
    np.testing.assert_allclose(np.asarray(d1), np.asarray(d2), rtol=1e-5, atol=1e-6)
    # second order (jvp of the custom jvp) still works
    h1 = jax.grad(lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(gelu_tanh(y)))(x)))(x)
    h2 = jax.grad(lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(jax.nn.gelu(y, approximate=True)))(x)))(x)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-4, atol=1e-5)


def test_export_import_roundtrip_exact(tmp_path):
    params = init_params(CFG, jax.random.key(0))
    lora = _random_lora(params, rank=4)
    path = L.save(lora, str(tmp_path / "lora.safetensors"))
    sd = L._read_safetensors(path)
    assert "blocks.1.self_attn.q.lora_A.default.weight" in sd
    assert sd["blocks.1.self_attn.q.lora_A.default.weight"].shape == (4, 24)
    assert sd["blocks.0.ffn.2.lora_B.default.weight"].shape == (24, 4)
    back = L.load(path, params, targets=L.DEFAULT_TARGETS)
    for k, v in flatten(lora).items():
        np.testing.assert_array_equal(np.asarray(flatten(back)[k]), np.asarray(v))
    # the official files come with a pipe.dit. prefix and sometimes without ".default"
    alt = {("pipe.dit." + k).replace(".default", ""): v for k, v in sd.items()}
    back2 = L.from_state_dict(alt, params)
    for k, v in flatten(lora).items():
        np.testing.assert_array_equal(np.asarray(flatten(back2)[k]), np.asarray(v))


def test_bad_lora_files_fail_clearly():
    params = init_params(CFG, jax.random.key(0))
    sd = L.to_state_dict(_random_lora(params, rank=4))
    bad = dict(sd)
    bad["blocks.0.self_attn.zz.lora_A.default.weight"] = np.zeros((4, 24), np.float32)
    bad["blocks.0.self_attn.zz.lora_B.default.weight"] = np.zeros((24, 4), np.float32)
    with pytest.raises(L.LoRAError, match="no Linear 'blocks.0.self_attn.zz'"):
        L.from_state_dict(bad, params)
    bad = dict(sd)
    bad["blocks.0.self_attn.q.lora_A.default.weight"] = np.zeros((8, 24), np.float32)
    bad["blocks.0.self_attn.q.lora_B.default.weight"] = np.zeros((24, 8), np.float32)
    with pytest.raises(L.LoRAError, match="mismatched LoRA ranks"):
        L.from_state_dict(bad, params)
    bad = {k: v for k, v in sd.items() if ".ffn.0." not in k}
    with pytest.raises(L.LoRAError, match="missing target"):
        L.from_state_dict(bad, params, targets=L.DEFAULT_TARGETS)
    bad = {k: v for k, v in sd.items() if not k.startswith("blocks.1.cross_attn.v.")}
    with pytest.raises(L.LoRAError, match=r"missing blocks \[1\]"):
        L.from_state_dict(bad, params)
    with pytest.raises(L.LoRAError, match="unknown key 'foo'"):
        L.from_state_dict({"foo": np.zeros(2)}, params)


def test_official_merge_parity_with_pytorch(tmp_path):
    """Our load(dir, lora=..., lora_scale=s) vs diffusers with the same SVI LoRA merged the official way."""
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from svi_jax.convert.dit import convert, diffusers_to_official
    from tests.torch_ref import tiny_wan_diffusers

    model = tiny_wan_diffusers(i2v=True, seed=5, num_layers=2, heads=2, head_dim=12, in_channels=9)
    model.save_pretrained(str(tmp_path / "ref"), safe_serialization=True)
    convert(str(tmp_path / "ref"), str(tmp_path / "ours"), show_progress=False)
    ours_base = svi_jax.load(str(tmp_path / "ours"))
    lora = _random_lora(ours_base.params, rank=6, seed=9)
    path = L.save(lora, str(tmp_path / "svi_lora.safetensors"), prefix="pipe.dit.")
    s = 0.8
    # official merge on the official-layout state dict: W += s * B @ A
    official = {diffusers_to_official(k): v.clone() for k, v in model.state_dict().items()}
    sd = L._read_safetensors(path)
    for k in sd:
        if ".lora_A." in k:
            name = k[len("pipe.dit."):].split(".lora_A.")[0]
            A = torch.from_numpy(sd[k])
            B = torch.from_numpy(sd[k.replace(".lora_A.", ".lora_B.")])
            official[name + ".weight"] += s * (B @ A)
    model.load_state_dict(convert_wan_transformer_to_diffusers(official))
    merged = svi_jax.load(str(tmp_path / "ours"), lora=path, lora_scale=s)
    r = np.random.RandomState(0)
    x = r.randn(1, 3, 4, 6, 4).astype(np.float32)
    y = r.randn(1, 3, 4, 6, 5).astype(np.float32)
    ctx = r.randn(1, 512, 20).astype(np.float32)
    clip = r.randn(1, 257, 20).astype(np.float32)
    t = np.array([321.0], np.float32)
    with torch.no_grad():
        ref = model(hidden_states=torch.from_numpy(np.concatenate([x, y], -1)).permute(0, 4, 1, 2, 3),
                    timestep=torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                    encoder_hidden_states_image=torch.from_numpy(clip), return_dict=False)[0]
    ref = ref.permute(0, 2, 3, 4, 1).numpy()
    out = np.asarray(merged(x, t, ctx, clip_fea=clip, y=y))
    base = np.asarray(ours_base(x, t, ctx, clip_fea=clip, y=y))
    err = max_rel_err(out, ref)
    print(f"merged SVI LoRA vs PyTorch official merge: max rel err {err:.2e}")
    assert max_rel_err(base, ref) > 1e-2 and err < 1e-5
