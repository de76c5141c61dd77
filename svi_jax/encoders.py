"""The frozen encoders (VAE or patch codec, UMT5, CLIP; wav2vec2 for Talk) and the pure functions every caller uses.

``make_encoders(config)`` returns a :class:`FrozenEncoders`: the frozen params (``.params`` =
``{'vae', 't5', 'clip'?}``, as they sit in the train state next to the DiT) and pure, jittable functions of them:

* ``latents(vae_params, video)``: video ``[B, 1+4k, H, W, 3]`` in [-1, 1] -> normalised latents ``[B, 1+k, h, w, z]``,
* ``video(vae_params, z)``: normalised latents -> video in [-1, 1],
* ``context(t5_params, ids, mask)``: token ids -> UMT5 context ``[B, L, text_dim]`` (``tokenize`` on the host),
* ``clip_tokens(clip_params, frames)``: frames ``[B, H, W, 3]`` -> CLIP tokens ``[B, N, image_dim]``,
* ``y(vae_params, cond)``: condition frames -> ``mask ++ latents`` (:func:`svi_jax.conditioning.build_y`).

Encoders come from converted checkpoints (``config.checkpoints.{vae,t5,clip,tokenizer}``) or, for the tiny configs,
from a seeded random init of the architectures in ``config.encoders`` (the same code path at tiny width). Training
(:mod:`svi_jax.conditioners`), the latent cache (:mod:`svi_jax.data.cache`) and sampling all build them here.
This module imports only :mod:`svi_jax.models` and :mod:`svi_jax.conditioning`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.conditioning import build_y
from svi_jax.models.clip import clip_tokens

DTYPES = ("float32", "bfloat16")


class ByteTokenizer:
    """UTF-8 bytes as token ids (pad 0, eos 1, byte b -> b + 2) for tiny configs without a tokenizer file."""

    vocab_size = 258

    def __init__(self, text_len: int):
        self.text_len = text_len

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.zeros((len(texts), self.text_len), np.int32)
        mask = np.zeros((len(texts), self.text_len), np.int32)
        for i, t in enumerate(texts):
            toks = [b + 2 for b in t.encode("utf-8")][: self.text_len - 1] + [1]
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        return ids, mask


# ------------------------------------------------------------------------------------------------ video codec


def vae_encode_fn(cfg):
    """Pure ``(params, video [B, 1+4k, H, W, 3]) -> normalised latents`` (the streaming encode under ``lax.scan``)."""
    from svi_jax.models.vae import encode_video

    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    std = jnp.asarray(cfg.latents_std, jnp.float32)
    return lambda params, video: (encode_video(params, video, cfg=cfg).astype(jnp.float32) - mean) / std


def vae_decode_fn(cfg):
    """Pure ``(params, normalised latents [B, 1+k, h, w, z]) -> video [B, 1+4k, 8h, 8w, 3]`` in [-1, 1]."""
    from svi_jax.models.vae import decode_video

    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    std = jnp.asarray(cfg.latents_std, jnp.float32)
    return lambda params, z: decode_video(params, z.astype(jnp.float32) * std + mean, cfg=cfg)


class Codec:
    """Pixels <-> normalised latents as pure functions: ``encode(params, video)``, ``decode(params, z)``.

    ``kind`` 'wan' (the Wan2.1 VAE, from a checkpoint or a seeded random init) or 'patch' (the fixed invertible
    transform of :mod:`svi_jax.models.patch_codec`, for small experiments).
    """

    def __init__(self, kind, cfg, params, encode, decode, z_dim):
        self.kind, self.cfg, self.params, self.z_dim = kind, cfg, params, z_dim
        self.encode, self.decode = encode, decode

    def in_dtype(self, dtype: str) -> "Codec":
        """The Wan VAE computing in ``dtype`` (params cast); the patch codec is a fixed linear map, kept float32."""
        if self.kind != "wan":
            return self
        cfg, params = in_dtype(self.cfg, self.params, dtype)
        return Codec("wan", cfg, params, vae_encode_fn(cfg), vae_decode_fn(cfg), self.z_dim)

    @classmethod
    def from_config(cls, config) -> "Codec":
        from svi_jax.models import patch_codec
        from svi_jax.models import vae as vae_mod

        spec = config.encoders.vae.to_dict()
        if spec.get("kind", "wan") == "patch":
            pc = patch_codec.PatchCodecConfig.from_dict(spec)
            return cls("patch", pc, patch_codec.load_params(pc), lambda p, v: patch_codec.encode_latents(pc, p, v),
                       lambda p, z: patch_codec.decode_latents(pc, p, z), pc.z_dim)
        if config.checkpoints.vae:
            v = vae_mod.VAE.from_dir(config.checkpoints.vae)
            cfg, params = v.config, v.params
        else:
            cfg = vae_mod.VAEConfig.from_dict({k: v for k, v in spec.items() if k != "kind"})
            params = vae_mod.init_params(cfg, int(config.train.seed) + 11)
        return cls("wan", cfg, params, vae_encode_fn(cfg), vae_decode_fn(cfg), cfg.z_dim)


def in_dtype(cfg, params, dtype: str):
    """``(cfg, params)`` of a frozen encoder computing in ``dtype`` with its floating params cast to it."""
    def cast_leaf(a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return jax.ShapeDtypeStruct(a.shape, dtype) if isinstance(a, jax.ShapeDtypeStruct) else a.astype(dtype)

    cast = jax.tree.map(cast_leaf, params)
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, dtype=dtype, **({"param_dtype": dtype} if "param_dtype" in fields else {})), cast


_in_dtype = in_dtype   # the old private name (svi_jax.pipeline._in_dtype)


# ------------------------------------------------------------------------------------------------ text, image, audio


def make_text_encoder(config):
    """``(t5_config, t5_params, tokenizer)`` from ``config.checkpoints.t5`` or a seeded random tiny UMT5."""
    from svi_jax.models import t5 as t5_mod

    ck = config.checkpoints
    if ck.t5:
        t5 = t5_mod.T5Encoder.from_dir(ck.t5, tokenizer_dir=ck.tokenizer or None)
        return t5.config, t5.params, t5.tokenizer
    t5_cfg = t5_mod.T5Config.from_dict(config.encoders.t5.to_dict())
    if t5_cfg.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"config.encoders.t5.vocab_size must be >= {ByteTokenizer.vocab_size} for the byte "
                         f"tokenizer of the random tiny text encoder")
    return t5_cfg, t5_mod.T5Encoder.init(t5_cfg, int(config.train.seed) + 12).params, ByteTokenizer(t5_cfg.text_len)


def make_image_encoder(config):
    """``(clip_config, clip_params)`` from ``config.checkpoints.clip`` or a seeded random tiny CLIP."""
    from svi_jax.models import clip as clip_mod

    if config.checkpoints.clip:
        c = clip_mod.CLIPVision.from_dir(config.checkpoints.clip)
        return c.config, c.params
    cfg = clip_mod.CLIPConfig.from_dict(config.encoders.clip.to_dict())
    return cfg, clip_mod.CLIPVision.init(cfg, int(config.train.seed) + 13).params


def make_audio_encoder(config):
    """wav2vec2 from ``config.checkpoints.wav2vec2`` or a seeded random tiny one (``config.encoders.wav2vec2``)."""
    from svi_jax.models import wav2vec2 as w2v

    path = config.checkpoints.get("wav2vec2", "")
    if path:
        return w2v.Wav2Vec2Encoder.from_dir(path)
    cfg = w2v.Wav2Vec2Config.from_dict(config.encoders.wav2vec2.to_dict())
    return w2v.Wav2Vec2Encoder(cfg, w2v.init_params(cfg, jax.random.key(int(config.train.seed) + 14)))


# ------------------------------------------------------------------------------------------------ the object


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenEncoders:
    """The frozen video codec, UMT5 (+ tokenizer) and, for I2V, CLIP; the methods are pure in the params they take
    (jit them, or call them inside a jitted step with the params from the train state)."""

    codec: Codec
    t5_cfg: Any
    t5_params: Any
    tokenizer: Any
    clip_cfg: Any = None
    clip_params: Any = None

    @property
    def params(self) -> dict:
        """``{'vae', 't5'}`` plus ``'clip'`` when there is an image encoder."""
        out = {"vae": self.codec.params, "t5": self.t5_params}
        if self.clip_params is not None:
            out["clip"] = self.clip_params
        return out

    @property
    def z_dim(self) -> int:
        return self.codec.z_dim

    def in_dtype(self, dtype: str) -> "FrozenEncoders":
        """Every encoder computing in ``dtype`` ('float32' or 'bfloat16', params cast; the patch codec stays
        float32); 'float32' returns the encoders unchanged."""
        if dtype not in DTYPES:
            raise ValueError(f"config.encoders.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if dtype == "float32":
            return self
        t5_cfg, t5_params = in_dtype(self.t5_cfg, self.t5_params, dtype)
        clip_cfg, clip_params = self.clip_cfg, self.clip_params
        if clip_cfg is not None:
            clip_cfg, clip_params = in_dtype(clip_cfg, clip_params, dtype)
        return dataclasses.replace(self, codec=self.codec.in_dtype(dtype), t5_cfg=t5_cfg, t5_params=t5_params,
                                   clip_cfg=clip_cfg, clip_params=clip_params)

    def check_widths(self, text_dim: int, out_dim: int, owner: str = "config.model") -> None:
        """UMT5 width == ``text_dim`` and latent channels == ``out_dim`` (of the DiT), else a ValueError."""
        if self.t5_cfg.dim != text_dim:
            raise ValueError(f"text encoder width {self.t5_cfg.dim} != {owner}.text_dim {text_dim}")
        if self.z_dim != out_dim:
            raise ValueError(f"VAE z_dim {self.z_dim} != {owner}.out_dim {out_dim}")

    def check_image_width(self, image_dim: int, owner: str = "config.model") -> None:
        if self.clip_cfg is not None and self.clip_cfg.dim != image_dim:
            raise ValueError(f"CLIP width {self.clip_cfg.dim} != {owner}.image_dim {image_dim}")

    # ---------------------------------------------------------------- pure functions
    def latents(self, vae_params, video):
        """Video ``[B, 1+4k, H, W, 3]`` in [-1, 1] -> normalised latents ``[B, 1+k, h, w, z]``."""
        return self.codec.encode(vae_params, video)

    def video(self, vae_params, z):
        """Normalised latents ``[B, 1+k, h, w, z]`` -> video ``[B, 1+4k, H, W, 3]`` in [-1, 1]."""
        return self.codec.decode(vae_params, z)

    def context(self, t5_params, ids, mask):
        """Token ids / mask ``[B, L]`` -> UMT5 context ``[B, L, text_dim]``."""
        from svi_jax.models.t5 import UMT5

        return UMT5(self.t5_cfg).apply({"params": t5_params}, ids, mask)

    def clip_tokens(self, clip_params, frames):
        """Frames ``[B, H, W, 3]`` in [-1, 1] -> CLIP tokens ``[B, N, image_dim]`` (:func:`models.clip.clip_tokens`)."""
        return clip_tokens(self.clip_cfg, clip_params, frames)

    def y(self, vae_params, cond, num_frames: Optional[int] = None):
        """Condition frames ``[B, T, H, W, 3]`` -> ``y = mask ++ latents(cond)`` ``[B, F, h, w, 4 + z]``."""
        return build_y(self.latents(vae_params, cond), int(num_frames or cond.shape[1]))

    def latents_and_y(self, vae_params, video, cond, num_frames: Optional[int] = None):
        """``(latents(video), y(cond))`` from one encode of both batches (video and cond of one shape)."""
        z = self.latents(vae_params, jnp.concatenate([video, cond], axis=0))
        x0, zc = jnp.split(z, 2, axis=0)
        return x0, build_y(zc, int(num_frames or cond.shape[1]))

    # ---------------------------------------------------------------- host side
    def tokenize(self, captions):
        """Captions -> ``(ids, mask)`` int32 numpy ``[B, text_len]``."""
        return self.tokenizer([str(c) for c in captions])


def make_encoders(config, *, image: Optional[bool] = None, dtype: Optional[str] = None,
                  abstract: bool = False) -> FrozenEncoders:
    """The frozen encoders of ``config`` (checkpoints or the seeded random tiny ones). ``image``: build CLIP
    (default: for I2V models); ``dtype``: see :meth:`FrozenEncoders.in_dtype` (default: as loaded).
    ``abstract=True``: the same encoders with ``jax.ShapeDtypeStruct`` params and nothing read or allocated (for
    ``svi_jax.plan``), see :func:`abstract_encoders`."""
    if image is None:
        image = config.model.model_type == "i2v"
    if abstract:
        enc = abstract_encoders(config, image)
        return enc if dtype is None else enc.in_dtype(dtype)
    codec = Codec.from_config(config)
    t5_cfg, t5_params, tok = make_text_encoder(config)
    clip_cfg, clip_params = make_image_encoder(config) if image else (None, None)
    enc = FrozenEncoders(codec, t5_cfg, t5_params, tok, clip_cfg, clip_params)
    return enc if dtype is None else enc.in_dtype(dtype)


def _arch(config, name: str, cls):
    """The architecture of encoder ``name``: the ``config.json`` of its converted checkpoint when that exists,
    else ``config.encoders.<name>`` (whose defaults are the Wan2.1 release's: VAE z 16, UMT5-XXL, CLIP ViT-H/14)."""
    import json
    import os

    path = config.checkpoints.get(name, "")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_dict(json.load(f)["config"])
    spec = {k: v for k, v in config.encoders[name].to_dict().items() if k != "kind"}
    return cls.from_dict(spec)


def abstract_encoders(config, image: bool) -> FrozenEncoders:
    """:class:`FrozenEncoders` whose params are ``jax.ShapeDtypeStruct`` trees (no weights read, nothing allocated):
    the same pure functions, so a step that calls them can be lowered and compiled ahead of time."""
    from svi_jax.models import clip as clip_mod
    from svi_jax.models import t5 as t5_mod
    from svi_jax.models import vae as vae_mod

    if config.encoders.vae.get("kind", "wan") == "patch":
        codec = Codec.from_config(config)                # a fixed transform (a few KB): its real params
        codec = Codec("patch", codec.cfg, jax.eval_shape(lambda: codec.params), codec.encode, codec.decode,
                      codec.z_dim)
    else:
        cfg = _arch(config, "vae", vae_mod.VAEConfig)
        codec = Codec("wan", cfg, vae_mod.param_shapes(cfg), vae_encode_fn(cfg), vae_decode_fn(cfg), cfg.z_dim)
    t5_cfg = _arch(config, "t5", t5_mod.T5Config)
    clip_cfg = _arch(config, "clip", clip_mod.CLIPConfig) if image else None
    return FrozenEncoders(codec, t5_cfg, t5_mod.param_shapes(t5_cfg), ByteTokenizer(t5_cfg.text_len), clip_cfg,
                          clip_mod.param_shapes(clip_cfg) if image else None)
