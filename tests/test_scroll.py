"""Scrolling synthetic clips (known ground truth at any length) and the PCA patch codec."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from svi_jax.data import scroll
from svi_jax.models import patch_vae


def test_scroll_is_a_torus_shift_with_a_known_future():
    f0 = scroll.first_frame("coffee", 16, 24, crop=0.5, cy=0.3, cx=0.7)
    assert f0.shape == (16, 24, 3) and f0.dtype == np.uint8 and f0.std() > 5
    v = scroll.make_scroll(f0, 30, "up-left", 2)
    np.testing.assert_array_equal(v[0], f0)
    np.testing.assert_array_equal(v[5], np.roll(f0, (10, 10), axis=(0, 1)))     # content moves down-right
    # a later window is the same sequence: start= continues it exactly; a full period returns to frame 0
    np.testing.assert_array_equal(scroll.make_scroll(f0, 4, "up-left", 2, start=7), v[7:11])
    np.testing.assert_array_equal(scroll.make_scroll(f0, 13, "left", 2)[12], f0)   # 24 px / 2 px per frame
    assert "pans up-left at 2 px per frame" in scroll.caption("up-left", 2)


def test_specs_cover_every_motion_and_keep_heldout_pictures_out():
    specs = scroll.dataset_specs(32, seed=0)
    assert {(s.direction, s.speed) for s in specs} == {(d, v) for d in scroll.DIRECTIONS for v in scroll.SPEEDS}
    assert not {s.picture for s in specs} & set(scroll.HELDOUT_PICTURES)
    assert specs == scroll.dataset_specs(32, seed=0)
    held = scroll.heldout_specs()
    assert len(held) >= 4 and {h.picture for h in held} == set(scroll.HELDOUT_PICTURES)


def test_pca_codec_round_trip_and_exact_codec_unchanged(tmp_path):
    specs = scroll.dataset_specs(24, seed=1)
    clips = np.stack([scroll.make_scroll(s.frame0(16, 24), 9, s.direction, s.speed) for s in specs])
    x = clips.astype(np.float32) / 127.5 - 1
    exact = patch_vae.PatchVAEConfig(spatial=2, temporal=4)
    z = patch_vae.encode_latents(exact, {}, jnp.asarray(x))
    assert z.shape == (24, 3, 8, 12, 48)
    np.testing.assert_allclose(patch_vae.decode_latents(exact, {}, z), x, atol=1e-6)

    cfg = patch_vae.PatchVAEConfig(spatial=2, temporal=4, components=16, basis=str(tmp_path / "c.npz"))
    arrays = patch_vae.fit_pca(cfg, x, 16)
    np.savez(cfg.basis, **arrays)
    params = patch_vae.load_params(cfg)
    b = np.asarray(params["basis"])
    np.testing.assert_allclose(b.T @ b, np.eye(16), atol=1e-5)               # orthonormal
    zp = patch_vae.encode_latents(cfg, params, jnp.asarray(x))
    assert zp.shape == (24, 3, 8, 12, 16) and cfg.z_dim == 16
    np.testing.assert_allclose(np.asarray(zp).reshape(-1, 16).std(0), 1.0, rtol=1e-3)   # unit variance
    rec = np.asarray(patch_vae.decode_latents(cfg, params, zp))
    psnr = 10 * np.log10(4.0 / np.mean((rec - x) ** 2))                      # range [-1, 1]: peak^2 = 4
    assert psnr > 28, psnr
    # fewer components -> worse; the config must match the stored basis
    worse = patch_vae.fit_pca(cfg, x, 4)
    assert worse["std"].shape == (4,)
    np.savez(tmp_path / "w.npz", **worse)
    import pytest

    with pytest.raises(ValueError, match="basis has shape"):
        patch_vae.load_params(patch_vae.PatchVAEConfig(spatial=2, components=16, basis=str(tmp_path / "w.npz")))
