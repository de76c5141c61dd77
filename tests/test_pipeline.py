"""Conditioning and the in-step encoders: mask layout, pure VAE encode/decode == the streaming VAE, patch codec."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import tiny
from svi_jax.conditioning import build_y, i2v_mask
from svi_jax.encoders import ByteTokenizer, Codec


def test_i2v_mask_marks_only_the_first_frame():
    m = i2v_mask(17, 3, 5)
    assert m.shape == (5, 3, 5, 4)
    assert (m[0] == 1).all() and (m[1:] == 0).all()
    m5 = i2v_mask(17, 2, 2, num_marked=5)           # ref_pad_cfg style: 5 frames -> latent 0 and latent 1
    assert (m5[0] == 1).all() and (m5[1] == 1).all() and (m5[2:] == 0).all()
    y = build_y(jnp.ones((2, 5, 3, 5, 16)), 17)
    assert y.shape == (2, 5, 3, 5, 20) and float(y[0, 1, 0, 0, 0]) == 0.0 and float(y[0, 1, 0, 0, 4]) == 1.0


def test_wan_codec_matches_streaming_vae():
    from svi_jax.models.vae import VAE

    c = tiny.get_config()
    c.encoders.vae = ml_collections.ConfigDict(dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                                    temperal_downsample=[False, True, True]))
    codec = Codec.from_config(c)
    assert codec.kind == "wan"
    video = jax.random.uniform(jax.random.key(0), (1, 9, 16, 24, 3), minval=-1, maxval=1)
    z = jax.jit(codec.encode)(codec.params, video)
    ref = VAE(codec.cfg, codec.params)
    z_ref = ref.normalize(ref.encode(np.asarray(video), progress=False))
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_ref), rtol=1e-4, atol=1e-4)
    x = jax.jit(codec.decode)(codec.params, z)
    x_ref = ref.decode(ref.denormalize(np.asarray(z)), progress=False)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), rtol=1e-4, atol=1e-4)


def test_patch_codec_is_exactly_invertible():
    c = tiny.get_config()
    c.encoders.vae = ml_collections.ConfigDict(dict(kind="patch", spatial=4))
    codec = Codec.from_config(c)
    assert codec.z_dim == 192
    video = jax.random.uniform(jax.random.key(1), (2, 9, 16, 24, 3), minval=-1, maxval=1)
    z = codec.encode(codec.params, video)
    assert z.shape == (2, 3, 4, 6, 192)
    np.testing.assert_allclose(np.asarray(codec.decode(codec.params, z)), np.asarray(video), atol=1e-6)


def test_byte_tokenizer():
    ids, mask = ByteTokenizer(8)(["ab", "héllo wörld"])
    assert ids.shape == (2, 8) and list(ids[0, :3]) == [ord("a") + 2, ord("b") + 2, 1] and mask[0].sum() == 3
    assert mask[1].sum() == 8 and ids[1, -1] == 1     # truncated, keeps the eos


def test_handcrafted_degradation():
    from svi_jax.augment import degrade

    x = jax.random.uniform(jax.random.key(2), (6, 3, 16, 16, 3), minval=-0.8, maxval=0.8)
    y, applied = jax.jit(degrade, static_argnums=(2, 3))(jax.random.key(3), x, 1.0, 0.5)
    assert y.shape == x.shape and float(jnp.abs(y).max()) <= 1.0
    changed = np.asarray(jnp.abs(y - x).reshape(6, -1).max(-1) > 1e-3)
    np.testing.assert_array_equal(changed, np.asarray(applied) > 0)   # exactly the examples drawn are degraded
    assert 0 < changed.sum() < 6
    # every frame of an example gets the same degradation: each frame equals that frame degraded alone (same key)
    f = jax.jit(degrade, static_argnums=(2, 3))
    for t in range(x.shape[1]):
        alone, applied_t = f(jax.random.key(3), x[:, t:t + 1], 1.0, 0.5)
        np.testing.assert_array_equal(np.asarray(applied_t), np.asarray(applied))
        np.testing.assert_allclose(np.asarray(alone), np.asarray(y[:, t:t + 1]), rtol=1e-6, atol=1e-6)


def test_bf16_encoders_stay_close_to_float32():
    """``config.encoders.dtype='bfloat16'``: the frozen VAE / UMT5 / CLIP of the train step compute in bf16 (params
    cast) and their outputs stay within the stated tolerance of float32 (docs/train.md)."""
    from svi_jax.conditioners import make_conditioner

    c = tiny.get_config()
    c.encoders.vae = ml_collections.ConfigDict(dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                                    temperal_downsample=[False, True, True]))
    c.data.update(num_frames=9, height=16, width=32)
    k = jax.random.split(jax.random.key(4), 4)
    batch = {"video": np.asarray(jax.random.uniform(k[0], (2, 9, 16, 32, 3), minval=-1, maxval=1)),
             "cond": np.asarray(jax.random.uniform(k[1], (2, 9, 16, 32, 3), minval=-1, maxval=1)),
             "first_frame": np.asarray(jax.random.uniform(k[2], (2, 16, 32, 3), minval=-1, maxval=1)),
             "caption": np.array(["a boat", "the view pans left"], dtype=object)}
    out = {}
    for dtype in ("float32", "bfloat16"):
        c.encoders.dtype = dtype
        cond = make_conditioner(c)
        out[dtype] = jax.jit(cond.prepare)(cond.params, cond.device_batch(batch), k[3])
        if dtype == "bfloat16":
            assert {str(a.dtype) for a in jax.tree.leaves(cond.params["t5"])} == {"bfloat16"}
    errs = {}
    for name in ("x0", "y", "context", "clip_fea"):
        a, b = np.asarray(out["float32"][name], np.float32), np.asarray(out["bfloat16"][name], np.float32)
        errs[name] = float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))
        assert 0 < errs[name] < 0.05, errs          # bf16 rounding (3 significant digits), not a different model
    c.encoders.dtype = "float16"
    try:
        make_conditioner(c)
        raise AssertionError("float16 accepted")
    except ValueError as e:
        assert "encoders.dtype" in str(e)


def test_conditioner_refuses_a_clip_width_that_is_not_the_dits():
    from svi_jax.conditioners import make_conditioner

    for dtype in ("float32", "bfloat16"):
        c = tiny.get_config()
        c.encoders.dtype = dtype
        c.encoders.clip.dim = int(c.model.image_dim) + 8
        try:
            make_conditioner(c)
            raise AssertionError(f"{dtype}: a CLIP of the wrong width was accepted")
        except ValueError as e:
            assert "CLIP width" in str(e), e
