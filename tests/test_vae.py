"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan (both checkpoint layouts), streaming, tiling, errors.

The diffusers model is built here with a tiny config and *every* parameter randomised; our model gets its
weights only through the converter. Relative error = max|ours - ref| / max|ref| (float32).
"""
from __future__ import annotations

import functools
import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402

import svi_jax  # noqa: E402
from svi_jax.model_dirs import CheckpointError, flatten  # noqa: E402
from svi_jax.convert import vae as conv  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.models.vae import VAE, VAEConfig, encode_video, param_logical_axes, param_shapes  # noqa: E402
from tests.torch_ref import from_torch_cli, max_rel_err  # noqa: E402

TOL = 1e-4
# Wan2.1's structure (4 levels, 2 res blocks, temporal (F, T, T), z_dim 16) at base width 8.
CFG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
# A different structure (2 levels, 1 res block, one temporal 2x) for the tiling test.
CFG_SMALL = dict(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0],
                 scale_factor_spatial=2, scale_factor_temporal=2)
B, H, W = 2, 24, 40  # not square, not powers of two


def make_torch_vae(cfg: dict, seed: int):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # re-randomise everything (diffusers inits gammas to 1, ...)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def t2j(x):  # torch [B, C, T, H, W] -> numpy [B, T, H, W, C]
    return x.detach().permute(0, 2, 3, 4, 1).numpy()


def j2t(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def ref_encode(model, video):
    with torch.no_grad():
        return t2j(model.encode(j2t(video)).latent_dist.mean)


def ref_decode(model, z):
    with torch.no_grad():
        return t2j(model.decode(j2t(z)).sample)


@pytest.fixture(scope="module")
def torch_vae():
    return make_torch_vae(CFG, seed=0)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory, torch_vae):
    d = str(tmp_path_factory.mktemp("diffusers_vae"))
    torch_vae.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vae(tmp_path_factory, diffusers_dir):
    """Converted with the CLI, opened with svi_jax.load."""
    dst = str(tmp_path_factory.mktemp("jax_vae"))
    assert from_torch_cli("vae", "--src", diffusers_dir, "--dst", dst) == 0
    model = svi_jax.load(dst)
    assert isinstance(model, VAE)
    return model


@pytest.fixture(scope="module")
def video():
    return np.random.default_rng(0).uniform(-1, 1, (B, 9, H, W, 3)).astype(np.float32)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_parity(vae, torch_vae, video, frames):
    x = video[:, :frames]
    z = vae.encode(x)
    assert z.shape == (B, 1 + (frames - 1) // 4, H // 8, W // 8, 16)
    err = max_rel_err(z, ref_encode(torch_vae, x))
    print(f"encode T={frames}: max rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_parity(vae, torch_vae, latent_frames):
    z = np.random.default_rng(latent_frames).standard_normal((B, latent_frames, H // 8, W // 8, 16)).astype(
        np.float32)
    x = vae.decode(z)
    ref = ref_decode(torch_vae, z)
    assert x.shape == (B, 1 + 4 * (latent_frames - 1), H, W, 3)
    assert np.abs(x).max() <= 1.0
    assert (np.abs(ref) < 0.999).mean() > 0.5  # the comparison is not dominated by clamping
    err = max_rel_err(x, ref)
    print(f"decode L={latent_frames}: max rel err {err:.2e}")
    assert err <= TOL


def test_streaming_equals_whole_sequence(vae, video):
    z_stream = vae.encode(video, chunk=1)
    z_whole = vae.encode(video, chunk=None)  # frames 1..8 in one step
    e_enc = max_rel_err(z_whole, z_stream)
    x_stream = vae.decode(z_stream, chunk=1, clamp=False)
    x_whole = vae.decode(z_stream, chunk=None, clamp=False)
    e_dec = max_rel_err(x_whole, x_stream)
    print(f"whole vs streaming: encode {e_enc:.2e}, decode {e_dec:.2e}")
    assert e_enc <= 1e-5 and e_dec <= 1e-5
    # iter_decode streams the same frames: first frame, then 4 per latent frame
    pieces = list(vae.iter_decode(z_stream, clamp=False, progress=False))
    assert [(t0, p.shape[1]) for t0, p in pieces] == [(0, 1), (1, 4), (5, 4)]
    np.testing.assert_array_equal(np.concatenate([p for _, p in pieces], 1), x_stream)
    clamped = np.concatenate([p for _, p in vae.iter_decode(z_stream, progress=False)], 1)
    np.testing.assert_array_equal(clamped, np.clip(x_stream, -1, 1))
    # the pure lax.scan version for use inside a jitted step (decode_video shares its scan helper)
    z_scan = jax.jit(functools.partial(encode_video, cfg=vae.config))(vae.params, video)
    e_scan = max_rel_err(z_scan, z_stream)
    print(f"lax.scan encode vs streaming: {e_scan:.2e}")
    assert e_scan <= 1e-5


def official_state_dict(diffusers_sd: dict) -> dict:
    """diffusers -> official Wan2.1_VAE.pth layout via our key map, checked against diffusers' own
    official->diffusers converter (the inverse direction)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    omap = conv.official_key_map(VAEConfig.from_dict(CFG))
    assert set(omap) == set(diffusers_sd)
    official = {omap[k]: v for k, v in diffusers_sd.items()}
    back = convert_wan_vae_to_diffusers(official)
    assert set(back) == set(diffusers_sd)
    for k, v in back.items():
        assert v is diffusers_sd[k], k
    return official


def test_official_layout(tmp_path, torch_vae, vae):
    official = official_state_dict(torch_vae.state_dict())
    path = str(tmp_path / "Wan2.1_VAE.pth")
    torch.save(official, path)
    # No config.json beside it: Wan2.1's structure with base_dim read from the tensors (as for the real file).
    cfg, params, layout = conv.convert(path, show_progress=False)
    assert layout == "official" and cfg.base_dim == 8 and cfg.dim_mult == (1, 2, 4, 4)
    ours, ref = flatten(params), flatten(vae.params)
    assert set(ours) == set(ref)
    sd = torch_vae.state_dict()
    for k in ref:
        np.testing.assert_array_equal(ours[k], np.asarray(ref[k]), err_msg=k)
        # and back to PyTorch's layout
        np.testing.assert_array_equal(conv.to_torch(ours[k], k), sd[conv.diffusers_key(k)].numpy(), err_msg=k)
    assert cfg == vae.config  # -> reuses the compiled functions below
    z = np.random.default_rng(5).standard_normal((B, 2, H // 8, W // 8, 16)).astype(np.float32)
    err = max_rel_err(VAE(cfg, params).decode(z), ref_decode(torch_vae, z))
    print(f"official layout decode: max rel err {err:.2e}")
    assert err <= TOL


def test_bad_checkpoints(tmp_path, torch_vae, capsys):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in torch_vae.state_dict().items()}

    def write(name, state):
        d = tmp_path / name
        d.mkdir()
        save_file(state, str(d / "diffusion_pytorch_model.safetensors"))
        (d / "config.json").write_text(json.dumps(CFG))
        return str(d)

    missing = dict(sd)
    del missing["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    with pytest.raises(ConversionError, match=r"missing key 'decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut"
                                              r"\.weight' \(expected shape \(32, 16, 1, 1, 1\)\)"):
        conv.convert(write("missing", missing), show_progress=False)

    wrong = dict(sd)
    wrong["encoder.mid_block.attentions.0.to_qkv.weight"] = torch.zeros(90, 32, 1, 1)
    with pytest.raises(ConversionError, match=r"key 'encoder\.mid_block\.attentions\.0\.to_qkv\.weight': "
                                              r"expected shape \(96, 32, 1, 1\), got \(90, 32, 1, 1\)"):
        conv.convert(write("wrong_shape", wrong), show_progress=False)

    extra = dict(sd)
    extra["decoder.extra_layer.weight"] = torch.zeros(3, 3)
    src = write("unexpected", extra)
    with pytest.raises(ConversionError, match=r"unexpected key 'decoder\.extra_layer\.weight' \(shape \(3, 3\)\)"):
        conv.convert(src, show_progress=False)
    # the CLI reports it and exits with status 2
    assert from_torch_cli("vae", "--src", src, "--dst", str(tmp_path / "out")) == 2
    assert "decoder.extra_layer.weight" in capsys.readouterr().err

    with pytest.raises(ConversionError, match="cannot tell the VAE layout"):
        conv.convert(write("other", {"foo.weight": torch.zeros(2)}), show_progress=False)


def test_auto_dtype_keeps_bf16_sources(tmp_path, torch_vae, vae):
    """``--dtype auto`` (the CLI default): a bf16 source gives a bf16 checkpoint holding the source's values
    exactly, which decodes (float32 compute) as diffusers does with those weights; an fp32 source stays fp32 (the
    ``vae`` fixture, converted by the CLI without ``--dtype``)."""
    import copy

    assert {str(a.dtype) for a in jax.tree.leaves(vae.params)} == {"float32"}
    half = copy.deepcopy(torch_vae).to(torch.bfloat16)
    half.save_pretrained(str(tmp_path / "bf16"))
    assert from_torch_cli("vae", "--src", tmp_path / "bf16", "--dst", tmp_path / "ours") == 0
    model = svi_jax.load(str(tmp_path / "ours"))
    sd = half.state_dict()
    for k, v in flatten(model.params).items():
        assert str(v.dtype) == "bfloat16", k
        np.testing.assert_array_equal(conv.to_torch(np.asarray(v, np.float32), k),
                                      sd[conv.diffusers_key(k)].float().numpy(), err_msg=k)
    z = np.random.default_rng(7).standard_normal((1, 2, H // 8, W // 8, 16)).astype(np.float32)
    err = max_rel_err(model.decode(z), ref_decode(half.float(), z))
    print(f"bf16-stored VAE decode vs diffusers (fp32 compute): max rel err {err:.2e}")
    assert err <= TOL

def test_save_load_and_mismatched_dir(tmp_path, vae):
    d = vae.save(str(tmp_path / "saved"))
    again = svi_jax.load(d)
    assert again.config == vae.config
    a, b = flatten(again.params), flatten(vae.params)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # runtime options can be changed when loading
    assert svi_jax.load(d, tiling=True).config.tiling
    meta = json.loads((tmp_path / "saved" / "config.json").read_text())
    meta["config"]["base_dim"] = 16
    (tmp_path / "saved" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"saved/config\.json is corrupted"):   # the checksum sees the edit
        VAE.from_dir(d)
    from svi_jax.integrity import write_checksums

    write_checksums(d)                                     # a deliberate edit: re-sealed, the shapes are checked
    with pytest.raises(CheckpointError, match=r"key 'decoder/conv_in/bias': expected shape \(64,\), got \(32,\)"):
        VAE.from_dir(d)


def test_normalize_constants_and_roundtrip(vae):
    sig = inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters
    cfg = VAEConfig()  # Wan2.1 defaults
    np.testing.assert_array_equal(cfg.latents_mean, sig["latents_mean"].default)
    np.testing.assert_array_equal(cfg.latents_std, sig["latents_std"].default)
    z = np.random.default_rng(0).standard_normal((1, 2, 2, 3, 16)).astype(np.float32)
    zn = vae.normalize(z)
    np.testing.assert_allclose(zn[..., 3], (z[..., 3] - cfg.latents_mean[3]) / cfg.latents_std[3], rtol=1e-6)
    np.testing.assert_allclose(vae.denormalize(zn), z, rtol=1e-5, atol=1e-6)
    assert isinstance(vae.normalize(jax.numpy.asarray(z)), jax.Array)


def test_tiling_parity(tmp_path):
    """Spatial tiling with blending equals diffusers' enable_tiling, on another structure (2 levels, 1 res block,
    spatial 2x): decode over rows and columns of tiles, encode over one row. Tiles are independent in time, so
    one frame keeps the number of compiled tile shapes small."""
    from safetensors.torch import save_file

    model = make_torch_vae(CFG_SMALL, seed=1)
    tiles = dict(tile_sample_min_height=8, tile_sample_min_width=8, tile_sample_stride_height=4,
                 tile_sample_stride_width=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    cfg, params, _ = conv.convert(str(tmp_path / "vae.safetensors"), config=CFG_SMALL, show_progress=False)
    tiled = VAE(cfg, params).with_options(tiling=True, **tiles)
    video = np.random.default_rng(3).uniform(-1, 1, (1, 1, 4, 20, 3)).astype(np.float32)  # 1 row of tiles
    z = np.random.default_rng(4).standard_normal((1, 1, 6, 10, 4)).astype(np.float32)
    plain_enc, plain_dec = ref_encode(model, video), ref_decode(model, z)
    model.enable_tiling(**tiles)
    ref_enc, ref_dec = ref_encode(model, video), ref_decode(model, z)
    # tiling really changes the result (so this tests the blending)
    assert max_rel_err(plain_enc, ref_enc) > 1e-3 and max_rel_err(plain_dec, ref_dec) > 1e-3
    z_tiled, x_tiled = tiled.encode(video, progress=False), tiled.decode(z, progress=False)
    assert z_tiled.shape == (1, 1, 2, 10, 4) and x_tiled.shape == (1, 1, 12, 20, 3)
    e_enc, e_dec = max_rel_err(z_tiled, ref_enc), max_rel_err(x_tiled, ref_dec)
    print(f"tiled: encode {e_enc:.2e}, decode {e_dec:.2e}")
    assert e_enc <= TOL and e_dec <= TOL


def test_logical_axes_and_validation(vae):
    cfg = vae.config
    axes = flatten(param_logical_axes(cfg))
    shapes = flatten(param_shapes(cfg))
    assert set(axes) == set(shapes)
    for k, spec in axes.items():
        assert len(spec) == len(shapes[k].shape), k
    assert tuple(axes["encoder/conv_in/kernel"]) == (None, None, None, "conv_in", "conv_out")
    assert tuple(axes["decoder/mid_block/attentions_0/to_qkv/kernel"]) == ("conv_in", "conv_out")
    assert tuple(axes["decoder/norm_out/scale"]) == ("norm",)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(np.zeros((1, 4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(np.zeros((1, 1, 12, 8, 3), np.float32))
    with pytest.raises(ValueError, match="is_residual"):
        VAEConfig.from_dict({"is_residual": True})
