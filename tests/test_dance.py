"""SVI-Dance: the pose embedding vs a PyTorch nn.Sequential (through our converter), the DiT with pose tokens vs
diffusers' WanTransformer3DModel with the same addition, and the adapter converter round trip."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.convert import dance as dconv  # noqa: E402
from svi_jax.models.pose import PoseEmbedding, pose_grid  # noqa: E402
from tests.torch_ref import from_torch_cli, max_rel_err, randomize_, tiny_wan_diffusers  # noqa: E402

TOL = 1e-5


def torch_dwpose(dim: int, seed: int = 0):
    """The official module, transcribed (svi_video_dance.py L253-268; concat_dim = 4)."""
    nn = torch.nn
    c = 4 * 4
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv3d(3, c, (3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)), nn.SiLU(),
        nn.Conv3d(c, c, (3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)), nn.SiLU(),
        nn.Conv3d(c, c, (3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)), nn.SiLU(),
        nn.Conv3d(c, c, (3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1)), nn.SiLU(),
        nn.Conv3d(c, c, 3, stride=(2, 2, 2), padding=1), nn.SiLU(),
        nn.Conv3d(c, c, 3, stride=(2, 2, 2), padding=1), nn.SiLU(),
        nn.Conv3d(c, dim, (1, 2, 2), stride=(1, 2, 2), padding=0))
    return randomize_(m.eval(), seed, scale=0.5)


def torch_pose_forward(m, pose_bthwc):
    """The official call: ``dwpose_embedding(cat([pose[:, :, :1] x 3, pose], 2) / 255)`` -> b (f h w) c."""
    p = torch.from_numpy(np.asarray(pose_bthwc, np.float32)).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        out = m(torch.cat([p[:, :, :1].repeat(1, 1, 3, 1, 1), p], dim=2) / 255.0)
    b, c, f, h, w = out.shape
    return out.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c).numpy(), (f, h, w)


def fake_lora_sd(num_layers: int, dim: int, ffn: int, rank: int, seed: int = 0, prefix: str = "pipe.dit."):
    r = np.random.RandomState(seed)
    sd = {}
    for i in range(num_layers):
        for mod, (fin, fout) in {"self_attn.q": (dim, dim), "self_attn.k": (dim, dim), "self_attn.v": (dim, dim),
                                 "self_attn.o": (dim, dim), "cross_attn.q": (dim, dim), "cross_attn.k": (dim, dim),
                                 "cross_attn.v": (dim, dim), "cross_attn.o": (dim, dim), "ffn.0": (dim, ffn),
                                 "ffn.2": (ffn, dim)}.items():
            sd[f"{prefix}blocks.{i}.{mod}.lora_A.default.weight"] = torch.from_numpy(
                r.randn(rank, fin).astype(np.float32) * 0.1)
            sd[f"{prefix}blocks.{i}.{mod}.lora_B.default.weight"] = torch.from_numpy(
                r.randn(fout, rank).astype(np.float32) * 0.1)
    return sd


def fake_unianimate(path, dwpose, num_layers=2, dim=24, ffn=40, rank=4, with_randomref=True):
    """A tiny stand-in for UniAnimate-Wan2.1-14B-Lora-12000.ckpt: the Lightning trainable-parameter dict."""
    sd = fake_lora_sd(num_layers, dim, ffn, rank)
    sd.update({f"dwpose_embedding.{k}": v.detach().clone() for k, v in dwpose.state_dict().items()})
    if with_randomref:
        sd["randomref_embedding_pose.0.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("t,h,w", [(9, 48, 112), (5, 40, 72)])
def test_pose_embedding_matches_torch(tmp_path, t, h, w):
    dim = 24
    m = torch_dwpose(dim, seed=1)
    ckpt = str(tmp_path / "unianimate.ckpt")
    fake_unianimate(ckpt, m, dim=dim)
    _, pose_params, info = dconv.load_adapter(ckpt)           # through our converter
    assert info["skipped"] == ["randomref_embedding_pose.0.weight"] and info["dim"] == dim
    pose = np.random.RandomState(2).randint(0, 256, (2, t, h, w, 3)).astype(np.float32)   # batch 2
    ref, grid = torch_pose_forward(m, pose)
    assert pose_grid(t, h, w) == grid
    ours = PoseEmbedding(dim).apply({"params": pose_params}, jnp.asarray(pose))
    err = max_rel_err(ours, ref)
    print(f"pose embedding {t}x{h}x{w} max rel err {err:.2e}")
    assert ours.shape == ref.shape and err <= TOL


def test_dit_adds_pose_to_patch_tokens(tmp_path):
    """Our DiT (pose_embedding=True) vs diffusers' WanTransformer3DModel whose patch_embedding output gets the
    torch dwpose_embedding output added (the official ``x = add_condition + x`` after patchify)."""
    import svi_jax
    from svi_jax.convert.dit import convert

    model = tiny_wan_diffusers(i2v=True, seed=2, num_layers=2, heads=2, head_dim=12, out_channels=4, in_channels=9)
    src = str(tmp_path / "diffusers")
    model.save_pretrained(src, safe_serialization=True)
    convert(src, str(tmp_path / "ours"), show_progress=False)
    base = svi_jax.load(str(tmp_path / "ours"))
    dim = base.config.dim
    m = torch_dwpose(dim, seed=3)
    ckpt = str(tmp_path / "u.ckpt")
    fake_unianimate(ckpt, m, dim=dim, num_layers=2, ffn=40, rank=4)
    _, pose_params, _ = dconv.load_adapter(ckpt)

    r = np.random.RandomState(4)
    b, f, hl, wl = 2, 3, 6, 10
    x = r.randn(b, f, hl, wl, 4).astype(np.float32)
    y = r.randn(b, f, hl, wl, 5).astype(np.float32)
    ctx = r.randn(b, 7, 20).astype(np.float32)
    clip = r.randn(b, 257, 20).astype(np.float32)
    t = np.array([37.5, 912.25], np.float32)
    pose = r.randint(0, 256, (b, 4 * (f - 1) + 1, hl * 8, wl * 8, 3)).astype(np.float32)
    ptok, _ = torch_pose_forward(m, pose)

    def hook(_mod, _inp, out):                     # [B, C, F, H, W] + pose tokens in (f h w) order
        bb, c, ff, hh, ww = out.shape
        return out + torch.from_numpy(ptok).reshape(bb, ff, hh, ww, c).permute(0, 4, 1, 2, 3)

    handle = model.patch_embedding.register_forward_hook(hook)
    ctx_p = np.zeros((b, 512, 20), np.float32)
    ctx_p[:, :7] = ctx
    with torch.no_grad():
        ref = model(hidden_states=torch.from_numpy(np.concatenate([x, y], -1)).permute(0, 4, 1, 2, 3),
                    timestep=torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx_p),
                    encoder_hidden_states_image=torch.from_numpy(clip), return_dict=False)[0]
    handle.remove()
    ref = ref.permute(0, 2, 3, 4, 1).numpy()

    import dataclasses

    from svi_jax.models.dit import DiT

    cfg = dataclasses.replace(base.config, pose_embedding=True)
    dance = DiT(cfg, {**base.params, "dwpose_embedding": pose_params})
    out = np.asarray(dance(x, t, ctx, clip_fea=clip, y=y, extra={"pose": jnp.asarray(pose)}))
    err = max_rel_err(out, ref)
    print(f"DiT + pose tokens max rel err {err:.2e}")
    assert err <= TOL
    # precomputed tokens give the same; zeroed pose ('pose_keep' 0) gives the base model
    tok = PoseEmbedding(dim).apply({"params": pose_params}, jnp.asarray(pose))
    out2 = np.asarray(dance(x, t, ctx, clip_fea=clip, y=y, extra={"pose_tokens": tok}))
    np.testing.assert_allclose(out2, out, rtol=0, atol=1e-5 * np.abs(out).max())
    off = np.asarray(dance(x, t, ctx, clip_fea=clip, y=y,
                           extra={"pose": jnp.asarray(pose), "pose_keep": jnp.zeros((b,))}))
    np.testing.assert_allclose(off, np.asarray(base(x, t, ctx, clip_fea=clip, y=y)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pose"):
        dance(x, t, ctx, clip_fea=clip, y=y)
    with pytest.raises(ValueError, match="token grid"):
        dance(x, t, ctx, clip_fea=clip, y=y, extra={"pose": jnp.asarray(pose[:, :, :-8])})


def test_adapter_round_trip_cli(tmp_path):
    """.ckpt -> our adapter dir -> .ckpt and .safetensors: every tensor back exactly, names as the official."""
    from safetensors.numpy import load_file

    m = torch_dwpose(32, seed=5)
    src = str(tmp_path / "UniAnimate-Wan2.1-14B-Lora-12000.ckpt")
    sd = fake_unianimate(src, m, num_layers=3, dim=32, ffn=48, rank=8)
    assert from_torch_cli("dance", "--src", src, "--dst", str(tmp_path / "adapter")) == 0
    lora, pose, info = dconv.load_adapter(str(tmp_path / "adapter"))
    assert info["rank"] == 8 and info["num_layers"] == 3 and info["dim"] == 32
    want = {k: v.numpy() for k, v in sd.items() if not k.startswith("randomref")}
    for ext in ("ckpt", "safetensors"):
        dst = str(tmp_path / f"back.{ext}")
        assert from_torch_cli("dance-to-torch", "--src", str(tmp_path / "adapter"), "--dst", dst) == 0
        got = load_file(dst) if ext == "safetensors" else {k: v.numpy() for k, v in
                                                            torch.load(dst, weights_only=True).items()}
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the SVI-Dance .safetensors reads back like the .ckpt
    lora2, pose2, _ = dconv.load_adapter(str(tmp_path / "back.safetensors"))
    for a, b in zip(jax.tree.leaves((lora, pose)), jax.tree.leaves((lora2, pose2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adapter_errors_are_clear(tmp_path, capsys):
    m = torch_dwpose(16)
    bad = fake_lora_sd(1, 16, 24, 4)
    bad.update({f"dwpose_embedding.{k}": v for k, v in m.state_dict().items()})
    bad["dwpose_embedding.12.weight"] = torch.zeros(16, 16, 1, 3, 3)
    torch.save(bad, tmp_path / "shape.ckpt")
    with pytest.raises(ConversionError, match=r"dwpose_embedding.12: weight \(16, 16, 1, 3, 3\)"):
        dconv.load_adapter(str(tmp_path / "shape.ckpt"))
    del bad["dwpose_embedding.12.weight"]
    bad["mystery.weight"] = torch.zeros(2)
    torch.save(bad, tmp_path / "unknown.ckpt")
    assert from_torch_cli("dance", "--src", str(tmp_path / "unknown.ckpt"), "--dst", str(tmp_path / "o")) == 2
    assert "unknown key 'mystery.weight'" in capsys.readouterr().err
    torch.save(fake_lora_sd(1, 16, 24, 4), tmp_path / "nopose.ckpt")
    with pytest.raises(ConversionError, match="no dwpose_embedding"):
        dconv.load_adapter(str(tmp_path / "nopose.ckpt"))
    with pytest.raises(ConversionError, match="does not exist"):
        dconv.load_adapter(str(tmp_path / "missing.ckpt"))
