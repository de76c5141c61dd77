"""Wan2.2-A14B: both experts through our converter (official + diffusers folder layouts), ``svi_jax.load`` of the
pair, and two-expert sampling vs a PyTorch loop over two diffusers ``WanTransformer3DModel``s (no image embedder)
fed ``cat([latents, y])`` with the switch at the boundary."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import svi_jax  # noqa: E402
from svi_jax import flow  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.convert import wan22  # noqa: E402
from svi_jax.models.experts import DiTExperts  # noqa: E402
from svi_jax.denoise_experts import high_steps, make_expert_sampler, timestep_grid  # noqa: E402
from tests.test_dit import _write_official  # noqa: E402
from tests.torch_ref import max_rel_err, tiny_wan_diffusers  # noqa: E402

C, TEXT_LEN = 4, 16
IN = 2 * C + 4          # x (C) ++ y (4 mask + C latent), as Wan2.2-I2V's 16 + 4 + 16 = 36


def _expert(seed):
    return tiny_wan_diffusers(i2v=False, seed=seed, num_layers=2, heads=2, head_dim=8, out_channels=C,
                              in_channels=IN)   # i2v=False: no image embedder, no add_k/v_proj (Wan2.2 I2V)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny random experts saved as a diffusers folder and as an official Wan2.2 folder, both converted."""
    d = tmp_path_factory.mktemp("wan22")
    high, low = _expert(11), _expert(12)
    dif = d / "diffusers"
    for sub, m in (("transformer", high), ("transformer_2", low)):
        m.save_pretrained(str(dif / sub), safe_serialization=True)
        p = dif / sub / "config.json"
        cfg = json.load(open(p))
        cfg["text_len"] = TEXT_LEN
        json.dump(cfg, open(p, "w"))
    json.dump({"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9}, open(dif / "model_index.json", "w"))
    off = d / "official"
    for sub, m in (("high_noise_model", high), ("low_noise_model", low)):
        _write_official(m, str(off / sub))
        p = off / sub / "config.json"
        cfg = json.load(open(p))
        cfg["text_len"] = TEXT_LEN
        json.dump(cfg, open(p, "w"))
    out = {}
    for layout, src in (("diffusers", dif), ("official", off)):
        s = wan22.convert(str(src), str(d / f"ours_{layout}"), show_progress=False)
        assert s["layout"] == layout
        out[layout] = (s, str(d / f"ours_{layout}"))
    return dict(high=high, low=low, converted=out, dir=d)


def test_convert_both_layouts_and_load_the_pair(pair):
    (sd, dd), (so, do) = pair["converted"]["diffusers"], pair["converted"]["official"]
    assert sd["boundary"] == 0.9                 # model_index.json's boundary_ratio
    assert so["boundary"] == 0.9                 # no index: Wan2.2's I2V config (0.900)
    for s in (sd, so):
        c = s["config"]
        assert c["model_type"] == "i2v" and c["image_embedding"] is False and c["in_dim"] == IN
    a, b = svi_jax.load(dd), svi_jax.load(do)
    assert isinstance(a, DiTExperts) and a.config.uses_clip is False
    assert a.expert(900.0) is a.high and a.expert(899.9) is a.low
    for name in ("high", "low"):
        pa, pb = jax.tree.leaves(a[name].params), jax.tree.leaves(b[name].params)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(pa, pb))
    # the experts really are the two different models, in the right slots
    wa = np.asarray(a.high.params["patch_embedding"]["kernel"])
    ref = pair["high"].patch_embedding.weight.detach().numpy().transpose(2, 3, 4, 1, 0)
    np.testing.assert_array_equal(wa, ref)
    assert not np.array_equal(wa, np.asarray(a.low.params["patch_embedding"]["kernel"]))


def test_converter_errors(tmp_path, pair):
    with pytest.raises(ConversionError, match="only one expert"):
        os.makedirs(tmp_path / "x" / "transformer")
        wan22.convert(str(tmp_path / "x"), str(tmp_path / "o"), show_progress=False)
    with pytest.raises(ConversionError, match="neither"):
        wan22.convert(str(tmp_path), str(tmp_path / "o2"), show_progress=False)


def _torch_two_expert_loop(high, low, noise, y, ctx, neg, steps, shift, cfg, boundary, t_bf16=False):
    """The official loop (wan_video_svi_pro.py L291-315, DiffSynth FlowMatchScheduler 'Wan': sigmas
    shift(linspace(1, 0, N + 1)[:-1]), t = 1000 sigma, Euler to 0) on two diffusers models, NCFHW."""
    sig = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    ts = sig * 1000
    x = torch.from_numpy(noise).permute(0, 4, 1, 2, 3)
    yt = torch.from_numpy(y).permute(0, 4, 1, 2, 3)
    pad = lambda c: torch.from_numpy(np.pad(c, ((0, 0), (0, TEXT_LEN - c.shape[1]), (0, 0))))  # noqa: E731
    c, n = pad(ctx), pad(neg)
    model = high
    with torch.no_grad():
        for i, t in enumerate(ts):
            if t.item() < boundary * 1000:
                model = low
            tt = t.reshape(1)
            if t_bf16:
                tt = tt.to(torch.bfloat16).float()
            inp = torch.cat([x, yt], dim=1)
            vc = model(hidden_states=inp, timestep=tt, encoder_hidden_states=c, return_dict=False)[0]
            vu = model(hidden_states=inp, timestep=tt, encoder_hidden_states=n, return_dict=False)[0]
            v = vu + cfg * (vc - vu)
            s_next = sig[i + 1] if i + 1 < steps else torch.tensor(0.0)
            x = x + v * (s_next - sig[i])
    return x.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("t_bf16", [False, True])
def test_two_expert_sampling_matches_torch_loop(pair, t_bf16):
    steps, shift, cfg, boundary = 6, 5.0, 4.0, 0.875
    flags = high_steps(timestep_grid(steps, shift)[1], boundary)
    assert flags.any() and not flags.all()       # both experts run
    r = np.random.RandomState(0)
    noise = r.randn(1, 3, 4, 6, C).astype(np.float32)
    y = r.randn(1, 3, 4, 6, 4 + C).astype(np.float32)
    ctx, neg = r.randn(1, 5, 20).astype(np.float32), r.randn(1, 3, 20).astype(np.float32)
    ref = _torch_two_expert_loop(pair["high"], pair["low"], noise, y, ctx, neg, steps, shift, cfg, boundary, t_bf16)
    ex = svi_jax.load(pair["converted"]["diffusers"][1])
    fn = make_expert_sampler(ex.config, steps, shift, cfg, boundary=boundary,
                             t_dtype="bfloat16" if t_bf16 else "float32", cfg_batch=False)
    out = np.asarray(fn({"high": ex.high.params, "low": ex.low.params}, noise, ctx, neg, y))
    err = max_rel_err(out, ref)
    print(f"two-expert sampling (t_bf16={t_bf16}) max rel err {err:.2e}")
    assert err <= 1e-4
    # the switch matters: the high expert alone gives a different result
    only_high = np.asarray(fn({"high": ex.high.params, "low": ex.high.params}, noise, ctx, neg, y))
    assert max_rel_err(only_high, ref) > 1e-2


def test_switch_step_is_the_official_one():
    _, t = timestep_grid(50, 5.0)
    flags = high_steps(t, 0.875)
    # SVI Pro (50 steps, shift 5): sigma_lin 1.00 .. 0.60 (21 steps) have t >= 875, t(0.58) = 873.5
    assert flags[:21].all() and not flags[21:].any()
    assert np.isclose(t[20], 882.35, atol=0.01) and np.isclose(t[21], 873.49, atol=0.01)
    assert (flow.timesteps(50, 5.0) == t).all()


def test_architecture_check_names_the_field(pair):
    """One architecture check (DiTConfig.architecture_mismatch) serves svi_jax.pro and svi_jax.train: a config that
    differs from the converted experts in any architecture field is refused, naming it."""
    import ml_collections

    from svi_jax.model_dirs import CheckpointError, read_meta
    from svi_jax.models.dit import DiT, DiTConfig
    from svi_jax.pro import load_experts

    _, path = pair["converted"]["official"]
    high = DiT.from_dir(os.path.join(path, read_meta(path)["config"]["high"])).config
    assert high.architecture_mismatch(high) is None
    for field, value in (("multitalk", True), ("image_embedding", not high.image_embedding), ("num_layers", 3)):
        other = DiTConfig(**{**high.to_dict(), "patch_size": tuple(high.patch_size), field: value})
        assert high.architecture_mismatch(other) == (field, getattr(high, field), value)
    assert high.architecture_mismatch(DiTConfig(**{**high.to_dict(), "patch_size": tuple(high.patch_size),
                                                   "pose_embedding": True})) is None   # Dance adds its layers
    config = ml_collections.ConfigDict(dict(model={**high.to_dict(), "num_layers": 3},
                                            checkpoints=dict(dit=path)))
    with pytest.raises(CheckpointError, match=r"config\.model\.num_layers = 3 but the high-noise expert"):
        load_experts(config, jax.random.PRNGKey(0), ("high",))
