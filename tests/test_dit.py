"""Wan DiT: parity with diffusers WanTransformer3DModel through our converter (both layouts), and properties."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from svi_jax.model_dirs import CheckpointError, flatten, unflatten  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.convert.dit import convert, diffusers_to_official  # noqa: E402
from svi_jax.models.dit import DiT, DiTConfig, init_params  # noqa: E402
import svi_jax  # noqa: E402
from tests.torch_ref import max_rel_err, tiny_wan_diffusers  # noqa: E402

TOL = 1e-5


def _inputs(i2v, batch, f, h, w, in_ch, out_ch, text_dim, text_tokens, image_dim, seed=0):
    r = np.random.RandomState(seed)
    x = r.randn(batch, f, h, w, out_ch).astype(np.float32)
    y = r.randn(batch, f, h, w, in_ch - out_ch).astype(np.float32) if i2v else None
    ctx = r.randn(batch, text_tokens, text_dim).astype(np.float32)
    clip = r.randn(batch, 257, image_dim).astype(np.float32) if i2v else None
    t = np.array([37.5, 912.25, 500.0][:batch], np.float32)
    return x, y, ctx, clip, t


def _torch_forward(model, x, y, ctx, clip, t, text_len):
    hs = np.concatenate([x, y], -1) if y is not None else x
    hs = torch.from_numpy(hs).permute(0, 4, 1, 2, 3)           # channels-last -> NCFHW
    ctx_p = np.zeros((ctx.shape[0], text_len, ctx.shape[2]), np.float32)
    ctx_p[:, : ctx.shape[1]] = ctx                                # Wan zero-pads text before the embedding
    with torch.no_grad():
        out = model(hidden_states=hs, timestep=torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx_p),
                    encoder_hidden_states_image=None if clip is None else torch.from_numpy(clip),
                    return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def _write_config_text_len(d, text_len):
    """Our converter reads text_len from a config.json beside the weights (diffusers has no such field)."""
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg["text_len"] = text_len
    json.dump(cfg, open(p, "w"))


@pytest.fixture(scope="module")
def t2v_ref(tmp_path_factory):
    model = tiny_wan_diffusers(i2v=False, seed=1, num_layers=2, heads=2, head_dim=12)
    d = str(tmp_path_factory.mktemp("t2v_diffusers"))
    model.save_pretrained(d, safe_serialization=True)
    _write_config_text_len(d, 16)
    return model, d


@pytest.fixture(scope="module")
def i2v_ref(tmp_path_factory):
    model = tiny_wan_diffusers(i2v=True, seed=2, num_layers=3, heads=3, head_dim=8, out_channels=4, in_channels=9)
    d = str(tmp_path_factory.mktemp("i2v_diffusers"))
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def test_t2v_parity_diffusers_layout(t2v_ref, tmp_path):
    model, src = t2v_ref
    s = convert(src, str(tmp_path / "ours"), show_progress=False)
    assert s["layout"] == "diffusers" and s["config"]["model_type"] == "t2v"
    ours = svi_jax.load(str(tmp_path / "ours"))
    assert ours.config.text_len == 16 and ours.config.num_heads == 2
    x, y, ctx, clip, t = _inputs(False, 2, 3, 6, 10, 4, 4, 20, 5, 20)
    out = np.asarray(ours(x, t, ctx))
    ref = _torch_forward(model, x, y, ctx, clip, t, 16)
    err = max_rel_err(out, ref)
    print(f"t2v diffusers-layout max rel err {err:.2e}")
    assert out.shape == (2, 3, 6, 10, 4)
    assert err <= TOL


def _write_official(model, d, shards=2):
    """Official-layout sharded safetensors written from diffusers weights by inverting diffusers' own key map."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import save_file

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    official = {diffusers_to_official(k): v for k, v in sd.items()}
    # diffusers' own official->diffusers map must take our inverse back to exactly the diffusers keys.
    back = convert_wan_transformer_to_diffusers(dict(official))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    os.makedirs(d, exist_ok=True)
    keys = sorted(official)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: official[k].contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(d, name))
        weight_map.update({k: name for k in part})
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json"), "w"))
    c = model.config
    json.dump({"_class_name": "WanModel", "num_heads": c.num_attention_heads, "eps": c.eps, "text_len": 512},
              open(os.path.join(d, "config.json"), "w"))
    return official


def test_i2v_parity_both_layouts(i2v_ref, tmp_path):
    model, src = i2v_ref
    x, y, ctx, clip, t = _inputs(True, 2, 5, 4, 6, 9, 4, 20, 7, 20, seed=3)
    ref = _torch_forward(model, x, y, ctx, clip, t, 512)
    _write_official(model, str(tmp_path / "official"))
    for layout, path in (("diffusers", src), ("official", str(tmp_path / "official"))):
        s = convert(path, str(tmp_path / f"ours_{layout}"), show_progress=False)
        assert s["layout"] == layout and s["config"]["model_type"] == "i2v"
        ours = svi_jax.load(str(tmp_path / f"ours_{layout}"))
        out = np.asarray(ours(x, t, ctx, clip_fea=clip, y=y))
        err = max_rel_err(out, ref)
        print(f"i2v {layout}-layout max rel err {err:.2e}")
        assert err <= TOL, (layout, err)


def test_export_back_to_official_roundtrip(t2v_ref, tmp_path):
    from svi_jax.convert.dit import export_official

    _, src = t2v_ref
    convert(src, str(tmp_path / "a"), show_progress=False)
    export_official(str(tmp_path / "a"), str(tmp_path / "off" / "model.safetensors"))
    convert(str(tmp_path / "off"), str(tmp_path / "b"), show_progress=False)
    pa, pb = flatten(svi_jax.load(str(tmp_path / "a")).params), flatten(svi_jax.load(str(tmp_path / "b")).params)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))


def _small_cfg(**kw):
    base = dict(model_type="i2v", dim=24, num_layers=3, num_heads=2, ffn_dim=40, freq_dim=16, text_dim=20,
                text_len=8, in_dim=9, out_dim=4, image_dim=20)
    base.update(kw)
    return DiTConfig(**base)


def _rand_inputs(cfg, seed=0, b=2, f=3, h=4, w=6):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (b, f, h, w, cfg.out_dim))
    y = jax.random.normal(k[1], (b, f, h, w, cfg.in_dim - cfg.out_dim))
    ctx = jax.random.normal(k[2], (b, 5, cfg.text_dim))
    clip = jax.random.normal(k[3], (b, 257, cfg.image_dim))
    return x, jnp.array([10.0, 700.0][:b]), ctx, clip, y


def _randomize_params(params, seed=0):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def test_scan_equals_unrolled():
    cfg = _small_cfg()
    params = _randomize_params(init_params(cfg, jax.random.key(0)))
    x, t, ctx, clip, y = _rand_inputs(cfg)
    out_scan = DiT(cfg, params)(x, t, ctx, clip_fea=clip, y=y)
    flat = flatten(params)
    unrolled = {}
    for k, v in flat.items():
        if k.startswith("blocks/"):
            for i in range(cfg.num_layers):
                unrolled[f"blocks_{i}/" + k[len("blocks/"):]] = v[i]
        else:
            unrolled[k] = v
    import dataclasses

    cfg_u = dataclasses.replace(cfg, scan_layers=False)
    out_unr = DiT(cfg_u, unflatten(unrolled))(x, t, ctx, clip_fea=clip, y=y)
    np.testing.assert_allclose(np.asarray(out_scan), np.asarray(out_unr), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["xla", "per_head"])
def test_attention_impls_and_remat_agree(attn):
    import dataclasses

    cfg = _small_cfg()
    params = _randomize_params(init_params(cfg, jax.random.key(0)), seed=4)
    x, t, ctx, clip, y = _rand_inputs(cfg, seed=5)
    base = DiT(cfg, params)(x, t, ctx, clip_fea=clip, y=y)
    other = DiT(dataclasses.replace(cfg, attention=attn, remat_policy="full"), params)(x, t, ctx, clip_fea=clip, y=y)
    np.testing.assert_allclose(np.asarray(other), np.asarray(base), rtol=1e-5, atol=1e-5)


def test_grad_runs_and_is_finite():
    cfg = _small_cfg(remat_policy="dots_saveable")
    params = _randomize_params(init_params(cfg, jax.random.key(0)), seed=1)
    x, t, ctx, clip, y = _rand_inputs(cfg)
    from svi_jax.models.dit import WanDiT

    def loss(p):
        return jnp.mean(WanDiT(cfg).apply({"params": p}, x, t, ctx, clip_fea=clip, y=y) ** 2)

    g = jax.grad(loss)(params)
    norms = [float(jnp.linalg.norm(v)) for v in jax.tree.leaves(g)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


def test_bf16_close_to_fp32():
    """bf16 params + compute vs fp32: stated tolerance 5e-2 relative (bf16 has 8 mantissa bits)."""
    import dataclasses

    cfg = _small_cfg()
    params = _randomize_params(init_params(cfg, jax.random.key(0)), seed=2)
    x, t, ctx, clip, y = _rand_inputs(cfg, seed=6)
    ref = DiT(cfg, params)(x, t, ctx, clip_fea=clip, y=y)
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = DiT(cfg16, p16)(x, t, ctx, clip_fea=clip, y=y)
    assert out.dtype == jnp.float32
    err = max_rel_err(out, ref)
    print(f"bf16 vs fp32 max rel err {err:.2e}")
    assert err < 5e-2


def test_t2v_requires_no_image_and_i2v_requires_both():
    cfg = _small_cfg()
    params = init_params(cfg, jax.random.key(0))
    x, t, ctx, clip, y = _rand_inputs(cfg)
    with pytest.raises(ValueError, match="needs both y"):
        DiT(cfg, params)(x, t, ctx)
    with pytest.raises(ValueError, match="more than text_len"):
        DiT(cfg, params)(x, t, jnp.zeros((2, 9, cfg.text_dim)), clip_fea=clip, y=y)


def test_bad_checkpoints_fail_clearly(t2v_ref, tmp_path):
    from safetensors.torch import load_file, save_file

    _, src = t2v_ref
    sd = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    cfg = open(os.path.join(src, "config.json")).read()

    def write(d, tensors):
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "diffusion_pytorch_model.safetensors"))
        open(os.path.join(d, "config.json"), "w").write(cfg)
        return d

    missing = dict(sd)
    del missing["blocks.1.attn1.to_k.weight"]
    with pytest.raises(ConversionError, match=r"blocks\.1\.self_attn\.k\.weight"):
        convert(write(str(tmp_path / "m"), missing), str(tmp_path / "o1"), show_progress=False)

    wrong = dict(sd)
    wrong["blocks.0.ffn.net.2.weight"] = torch.zeros(24, 41)
    with pytest.raises(ConversionError, match=r"blocks\.0\.ffn\.net\.2\.weight.*\(24, 40\).*\(24, 41\)"):
        convert(write(str(tmp_path / "w"), wrong), str(tmp_path / "o2"), show_progress=False)

    extra = dict(sd)
    extra["blocks.0.attn1.to_zz.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"unexpected source key 'blocks\.0\.self_attn\.to_zz\.weight'"):
        convert(write(str(tmp_path / "e"), extra), str(tmp_path / "o3"), show_progress=False)

    # A converted checkpoint whose config.json was edited no longer matches its params.
    convert(src, str(tmp_path / "good"), show_progress=False)
    meta = json.load(open(tmp_path / "good" / "config.json"))
    meta["config"]["ffn_dim"] = 48
    json.dump(meta, open(tmp_path / "good" / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"good/config\.json is corrupted"):   # its checksum sees the edit
        svi_jax.load(str(tmp_path / "good"))
    from svi_jax.integrity import write_checksums

    write_checksums(str(tmp_path / "good"))              # re-sealed on purpose: the shapes are checked
    with pytest.raises(CheckpointError, match=r"blocks/ffn/0/kernel.*expected shape \(2, 24, 48\), got \(2, 24, 40\)"):
        svi_jax.load(str(tmp_path / "good"))


def test_cli_converts(t2v_ref, tmp_path):
    import subprocess
    import sys

    _, src = t2v_ref
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "convert", "from_torch.py"), "dit", "--src", src, "--dst",
                        str(tmp_path / "cli"), "--no_progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "T2V DiT" in r.stdout and os.path.isfile(tmp_path / "cli" / "config.json")
    r = subprocess.run([sys.executable, os.path.join(root, "convert", "from_torch.py"), "dit", "--src",
                        str(tmp_path / "nothing_here"), "--dst", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_i2v_dit_to_torch_export_loads_in_diffusers(i2v_ref, tmp_path, dtype):
    """``dit-to-torch`` for I2V (img_emb, k_img/v_img) in fp32 and bf16: the official-layout file, mapped by
    diffusers' own single-file converter, loads into ``WanTransformer3DModel`` with every key and the same values
    (bf16: the source rounded to bf16, stored as bf16), and that model's forward equals ours."""
    import torch
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    from svi_jax.convert.dit import export_official

    model, src = i2v_ref
    convert(src, str(tmp_path / "ours"), dtype=dtype, show_progress=False)
    export_official(str(tmp_path / "ours"), str(tmp_path / "off" / "model.safetensors"))
    off = load_file(str(tmp_path / "off" / "model.safetensors"))
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert {v.dtype for v in off.values()} == {tdt}
    sd = convert_wan_transformer_to_diffusers(off)
    ref = {k: v.to(tdt) for k, v in model.state_dict().items()}
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k].to(tdt), ref[k]), k
    fresh = type(model).from_config(model.config).to(tdt)
    fresh.load_state_dict(sd, strict=True)
    assert any("add_k_proj" in k for k in sd) and any("image_embedder" in k for k in sd)
    # the exported weights in a float32 model (its rope buffers not rounded, as .to(bf16).float() would) have our
    # forward on the checkpoint we exported (float32 compute on the stored values)
    f32 = type(model).from_config(model.config).eval()
    f32.load_state_dict(sd, strict=True)
    x, y, ctx, clip, t = _inputs(True, 2, 5, 4, 6, 9, 4, 20, 7, 20, seed=4)
    ours = svi_jax.load(str(tmp_path / "ours"))
    assert ours.config.param_dtype == dtype
    out = np.asarray(ours(x, t, ctx, clip_fea=clip, y=y))
    err = max_rel_err(out, _torch_forward(f32, x, y, ctx, clip, t, ours.config.text_len))
    print(f"dit-to-torch {dtype} export: diffusers forward vs ours, max rel err {err:.2e}")
    assert err <= TOL


def test_auto_dtype_keeps_bf16_sources(i2v_ref, tmp_path):
    """``--dtype auto`` (the default): a bf16 source gives a bf16 checkpoint with the source's values exactly."""
    import torch

    model, _ = i2v_ref
    half = type(model).from_config(model.config)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    half.save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    s = convert(str(tmp_path / "bf16"), str(tmp_path / "ours"), show_progress=False)
    assert s["config"]["param_dtype"] == "bfloat16"
    dit = svi_jax.load(str(tmp_path / "ours"))
    k = flatten(dit.params)["patch_embedding/kernel"]
    assert str(k.dtype) == "bfloat16"
    w = half.state_dict()["patch_embedding.weight"].float().numpy()           # [out, in, t, h, w]
    np.testing.assert_array_equal(np.asarray(k.astype(jnp.float32)), w.transpose(2, 3, 4, 1, 0))
