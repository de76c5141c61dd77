"""The frozen encoders object (svi_jax.encoders): same values as the models called directly, as the trainer's
conditioner and the latent cache; one "apply CLIP to frames"; the old import paths are aliases of the new ones."""
from __future__ import annotations

import ast
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import tiny
from svi_jax.conditioning import build_y
from svi_jax.encoders import FrozenEncoders, make_encoders


def _config():
    c = tiny.get_config()
    c.encoders.vae = ml_collections.ConfigDict(dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                                    temperal_downsample=[False, True, True]))
    c.data.update(num_frames=9, height=16, width=32)
    return c


def _batch():
    k = jax.random.split(jax.random.key(4), 3)
    return {"video": np.asarray(jax.random.uniform(k[0], (2, 9, 16, 32, 3), minval=-1, maxval=1)),
            "cond": np.asarray(jax.random.uniform(k[1], (2, 9, 16, 32, 3), minval=-1, maxval=1)),
            "first_frame": np.asarray(jax.random.uniform(k[2], (2, 16, 32, 3), minval=-1, maxval=1)),
            "caption": np.array(["a boat", "the view pans left"], dtype=object)}


def test_encoders_match_the_models_called_directly():
    from svi_jax.models.clip import CLIPVision, CLIPVisionTower, preprocess
    from svi_jax.models.t5 import T5Encoder
    from svi_jax.models.vae import VAE

    c, b = _config(), _batch()
    enc = make_encoders(c)
    assert isinstance(enc, FrozenEncoders) and set(enc.params) == {"vae", "t5", "clip"}
    seed = int(c.train.seed)                                          # the trainer's seeded random tiny encoders
    np.testing.assert_array_equal(jax.tree.leaves(enc.t5_params)[0],
                                  jax.tree.leaves(T5Encoder.init(enc.t5_cfg, seed + 12).params)[0])
    np.testing.assert_array_equal(jax.tree.leaves(enc.clip_params)[0],
                                  jax.tree.leaves(CLIPVision.init(enc.clip_cfg, seed + 13).params)[0])

    z = jax.jit(enc.latents)(enc.codec.params, b["video"])
    vae = VAE(enc.codec.cfg, enc.codec.params)
    np.testing.assert_allclose(z, vae.normalize(vae.encode(b["video"], progress=False)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(enc.video)(enc.codec.params, z),
                               vae.decode(vae.denormalize(np.asarray(z)), progress=False), rtol=1e-4, atol=1e-4)

    ids, mask = enc.tokenize(b["caption"])
    ctx = jax.jit(enc.context)(enc.t5_params, ids, mask)
    np.testing.assert_array_equal(ctx, T5Encoder(enc.t5_cfg, enc.t5_params).encode_ids(ids, mask)[0])

    tok = jax.jit(enc.clip_tokens)(enc.clip_params, b["first_frame"])
    assert tok.shape == (2, enc.clip_cfg.num_tokens, enc.clip_cfg.dim)
    np.testing.assert_array_equal(tok, CLIPVision(enc.clip_cfg, enc.clip_params).encode(b["first_frame"]))
    old = jax.jit(lambda p, x: CLIPVisionTower(enc.clip_cfg).apply({"params": p}, preprocess(x, enc.clip_cfg)))
    np.testing.assert_array_equal(tok, old(enc.clip_params, b["first_frame"]))   # the trainer's old (uncast) form

    y = jax.jit(enc.y)(enc.codec.params, b["cond"])
    np.testing.assert_array_equal(y, build_y(jax.jit(enc.latents)(enc.codec.params, b["cond"]), 9))
    x0, y2 = jax.jit(enc.latents_and_y)(enc.codec.params, b["video"], b["cond"])
    np.testing.assert_allclose(x0, z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-5)


def test_clip_cast_to_its_dtype_changes_nothing():
    """Casting the preprocessed frames to CLIP's dtype (sampling, CLIPVision) or not (the trainer and the cache,
    before they shared one function) gives the same bits: the patch embedding casts its input first."""
    from svi_jax.models.clip import CLIPVisionTower, preprocess

    enc = make_encoders(_config()).in_dtype("bfloat16")
    assert enc.clip_cfg.dtype == "bfloat16"
    x = _batch()["first_frame"]
    new = jax.jit(enc.clip_tokens)(enc.clip_params, x)
    old = jax.jit(lambda p, f: CLIPVisionTower(enc.clip_cfg).apply({"params": p}, preprocess(f, enc.clip_cfg)))
    assert new.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(old(enc.clip_params, x), np.float32))


def test_conditioner_and_cache_use_the_encoders():
    from svi_jax.conditioners import PixelConditioner, make_conditioner
    from svi_jax.data.cache import encoders_from_train_config

    c, b = _config(), _batch()
    cond = make_conditioner(c)
    assert isinstance(cond, PixelConditioner)
    enc, p = cond.encoders, cond.params
    out = jax.jit(cond.prepare)(p, cond.device_batch(b), jax.random.key(0))
    x0, y = jax.jit(enc.latents_and_y)(p["vae"], b["video"], b["cond"])
    np.testing.assert_array_equal(out["x0"], x0)
    np.testing.assert_array_equal(out["y"], y)
    ids, mask = enc.tokenize(b["caption"])
    ctx = jax.jit(enc.context)(p["t5"], ids, mask)
    np.testing.assert_array_equal(out["context"], ctx)
    clip = jax.jit(enc.clip_tokens)(p["clip"], b["first_frame"])
    np.testing.assert_array_equal(out["clip_fea"], clip)

    host = encoders_from_train_config(c)                   # the latent cache's encoders: the same functions
    np.testing.assert_array_equal(host.video(b["video"]), jax.jit(enc.latents)(p["vae"], b["video"]))
    emb, m = host.text(list(b["caption"]))
    np.testing.assert_array_equal(emb, ctx)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_array_equal(host.image(b["first_frame"]), clip)


def test_patch_codec_encoders_and_bf16():
    c = tiny.get_config()                                  # the default tiny config: the PCA patch codec
    enc = make_encoders(c, image=False)
    assert enc.codec.kind == "patch" and enc.clip_cfg is None and "clip" not in enc.params
    assert enc.in_dtype("float32") is enc
    half = enc.in_dtype("bfloat16")
    assert half.codec is enc.codec and half.t5_cfg.dtype == "bfloat16"     # the patch codec stays float32
    try:
        enc.in_dtype("float16")
        raise AssertionError("float16 accepted")
    except ValueError as e:
        assert "encoders.dtype" in str(e)


def test_old_import_paths_are_aliases():
    from svi_jax import conditioners, encoders, pipeline, pro_train, talk_data
    from svi_jax.data import factory
    from svi_jax.models import patch_codec, patch_vae

    assert pipeline.Codec is encoders.Codec and pipeline.ByteTokenizer is encoders.ByteTokenizer
    assert pipeline.make_text_encoder is encoders.make_text_encoder
    assert pipeline.make_image_encoder is encoders.make_image_encoder
    assert pipeline.make_conditioner is conditioners.make_conditioner
    assert pipeline.PixelConditioner is conditioners.PixelConditioner
    assert pipeline.LatentConditioner is conditioners.LatentConditioner
    assert pipeline.make_data is factory.make_data
    assert pro_train.ProConditioner is conditioners.ProConditioner
    assert talk_data.TalkConditioner is conditioners.TalkConditioner
    assert patch_vae.PatchVAEConfig is patch_codec.PatchCodecConfig
    assert patch_vae.encode_latents is patch_codec.encode_latents

    from svi_jax import conditioning, pro                 # the Pro y layout: one function for training and sampling
    assert pro.pro_y16 is conditioning.pro_y16


def _svi_imports(path):
    """Every svi_jax module ``path`` imports (module level and inside functions)."""
    out = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("svi_jax")}
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("svi_jax"):
            out |= {n.module + "." + a.name for a in n.names}
    return out


def test_encoders_sit_low_and_the_cache_does_not_import_pipeline():
    root = os.path.join(os.path.dirname(__file__), "..", "svi_jax")
    low = ("svi_jax.models.", "svi_jax.conditioning", "svi_jax.errors", "svi_jax.logs")
    assert all(m.startswith(low) for m in _svi_imports(os.path.join(root, "encoders.py")))
    allowed = low + ("svi_jax.encoders", "svi_jax.augment")
    assert all(m.startswith(allowed) for m in _svi_imports(os.path.join(root, "conditioners.py")))
    for f in ("data/cache.py", "data/factory.py", "pro_train.py", "talk_data.py"):
        assert not any(m.startswith("svi_jax.pipeline") for m in _svi_imports(os.path.join(root, f))), f
