"""What feeds the train step: the frozen encoders as pure functions, and the data stream.

``make_conditioner(config)`` returns an object with

* ``params``: ``{'vae': ..., 't5': ..., 'clip': ...}`` (frozen; they live in the train state next to the DiT),
* ``prepare(params, batch, key)`` -> ``{x0, y, context, clip_fea}``: pure and jittable, run *inside* the train step
  (the official code also encodes every clip every step; a latent cache skips it, see ``svi_jax.data``),
* ``device_batch(host_batch)``: tokenises captions on the host and turns arrays into device arrays.

Encoders come from converted checkpoints (``config.checkpoints.{vae,t5,clip,tokenizer}``) or, for the tiny configs,
from a seeded random init of the architectures in ``config.encoders`` (the same code path at tiny width).
"""
from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np

from svi_jax.conditioning import build_y

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------ encoders


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
    transform of :mod:`svi_jax.models.patch_vae`, for small experiments).
    """

    def __init__(self, kind, cfg, params, encode, decode, z_dim):
        self.kind, self.cfg, self.params, self.encode, self.decode, self.z_dim = kind, cfg, params, encode, decode, z_dim

    def in_dtype(self, dtype: str) -> "Codec":
        """The Wan VAE computing in ``dtype`` (params cast); the patch codec is a fixed linear map, kept float32."""
        if self.kind != "wan":
            return self
        cfg, params = _in_dtype(self.cfg, self.params, dtype)
        return Codec("wan", cfg, params, vae_encode_fn(cfg), vae_decode_fn(cfg), self.z_dim)

    @classmethod
    def from_config(cls, config) -> "Codec":
        from svi_jax.models import patch_vae
        from svi_jax.models import vae as vae_mod

        spec = config.encoders.vae.to_dict()
        if spec.get("kind", "wan") == "patch":
            pc = patch_vae.PatchVAEConfig.from_dict(spec)
            return cls("patch", pc, patch_vae.load_params(pc), lambda p, v: patch_vae.encode_latents(pc, p, v),
                       lambda p, z: patch_vae.decode_latents(pc, p, z), pc.z_dim)
        if config.checkpoints.vae:
            v = vae_mod.VAE.from_dir(config.checkpoints.vae)
            cfg, params = v.config, v.params
        else:
            cfg = vae_mod.VAEConfig.from_dict({k: v for k, v in spec.items() if k != "kind"})
            params = vae_mod.init_params(cfg, int(config.train.seed) + 11)
        return cls("wan", cfg, params, vae_encode_fn(cfg), vae_decode_fn(cfg), cfg.z_dim)


def _in_dtype(cfg, params, dtype: str):
    """``(cfg, params)`` of a frozen encoder computing in ``dtype`` with its floating params cast to it."""
    import dataclasses

    import jax

    cast = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, dtype=dtype, **({"param_dtype": dtype} if "param_dtype" in fields else {})), cast


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


class PixelConditioner:
    """Encodes pixel batches (video, cond, first_frame, caption) with the frozen VAE, UMT5 and CLIP."""

    def __init__(self, config, codec: Codec, t5_cfg, t5_params, tokenizer, clip_cfg=None, clip_params=None):
        self.config = config
        self.codec, self.t5_cfg, self.clip_cfg = codec, t5_cfg, clip_cfg
        self.tokenizer = tokenizer
        self.params = {"vae": codec.params, "t5": t5_params}
        if clip_params is not None:
            self.params["clip"] = clip_params
        self._vae = codec.encode
        self.i2v = config.model.model_type == "i2v"
        self.num_frames = int(config.data.num_frames)

    def prepare(self, params, batch, key):
        from svi_jax.models.t5 import UMT5

        if self.i2v:
            cond = batch["cond"]
            hp = float(self.config.get("baseline", {}).get("handcrafted_p", 0.0))
            if hp > 0:   # the Tab. 7 baseline (config.baseline): handcrafted degradations of the condition frames
                from svi_jax.augment import degrade

                cond, _ = degrade(key, cond, float(self.config.baseline.get("handcrafted_strength", 1.0)), hp)
            both = jnp.concatenate([batch["video"], cond], axis=0)     # one encode for clip + condition
            z = self._vae(params["vae"], both)
            x0, zc = jnp.split(z, 2, axis=0)
            y = build_y(zc, self.num_frames)
        else:
            x0, y = self._vae(params["vae"], batch["video"]), None
        ctx = UMT5(self.t5_cfg).apply({"params": params["t5"]}, batch["ids"], batch["ids_mask"])
        out = {"x0": x0, "y": y, "context": ctx, "clip_fea": None}
        if self.i2v:
            from svi_jax.models.clip import CLIPVisionTower, preprocess

            out["clip_fea"] = CLIPVisionTower(self.clip_cfg).apply({"params": params["clip"]},
                                                                   preprocess(batch["first_frame"], self.clip_cfg))
        if "pose" in batch:
            out["pose"] = batch["pose"]
        return out

    def device_batch(self, batch: dict) -> dict:
        ids, mask = self.tokenizer([str(c) for c in batch["caption"]])
        out = {"ids": jnp.asarray(ids, jnp.int32), "ids_mask": jnp.asarray(mask, jnp.int32),
               "video": jnp.asarray(batch["video"], jnp.float32)}
        if self.i2v:
            out["cond"] = jnp.asarray(batch["cond"], jnp.float32)
            out["first_frame"] = jnp.asarray(batch["first_frame"], jnp.float32)
        if "pose" in batch:                          # SVI-Dance skeleton frames (0..255), fed to the DiT as extra
            out["pose"] = jnp.asarray(batch["pose"], jnp.float32)
        return out


class LatentConditioner:
    """Batches that already hold model inputs (a latent cache): ``latents``, ``y``, ``context``, ``clip_fea``."""

    params: dict = {}

    def __init__(self, config):
        self.i2v = config.model.model_type == "i2v"
        self.params = {}

    def prepare(self, params, batch, key):
        del params, key
        return {"x0": batch["latents"], "y": batch.get("y"), "context": batch["context"],
                "clip_fea": batch.get("clip_fea")}

    def device_batch(self, batch: dict) -> dict:
        keys = ("latents", "y", "context", "clip_fea") if self.i2v else ("latents", "context")
        return {k: jnp.asarray(batch[k], jnp.float32) for k in keys}


def make_conditioner(config, workdir: str | None = None):
    """Encoders from ``config.checkpoints`` or a seeded random init of ``config.encoders`` (tiny configs)."""
    if config.data.get("cache", ""):
        return LatentConditioner(config)
    if config.get("pro", None) is not None:     # SVI 2.0 Pro on Wan2.2: VAE + UMT5, the Pro y (svi_jax.pro_train)
        from svi_jax.pro_train import make_conditioner as pro_conditioner

        return pro_conditioner(config)
    codec = Codec.from_config(config)
    t5_cfg, t5_params, tok = make_text_encoder(config)
    clip_cfg = clip_params = None
    if config.model.model_type == "i2v":
        clip_cfg, clip_params = make_image_encoder(config)
        if clip_cfg.dim != config.model.image_dim:
            raise ValueError(f"CLIP width {clip_cfg.dim} != config.model.image_dim {config.model.image_dim}")
    dtype = config.encoders.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.encoders.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if dtype == "bfloat16":                      # the frozen encoders in bf16 inside the train step
        codec = codec.in_dtype(dtype)
        t5_cfg, t5_params = _in_dtype(t5_cfg, t5_params, dtype)
        if clip_cfg is not None:
            clip_cfg, clip_params = _in_dtype(clip_cfg, clip_params, dtype)
    if t5_cfg.dim != config.model.text_dim:
        raise ValueError(f"text encoder width {t5_cfg.dim} != config.model.text_dim {config.model.text_dim}")
    if codec.z_dim != config.model.out_dim:
        raise ValueError(f"VAE z_dim {codec.z_dim} != config.model.out_dim {config.model.out_dim}")
    cond = PixelConditioner(config, codec, t5_cfg, t5_params, tok, clip_cfg, clip_params)
    if config.model.get("multitalk", False):    # SVI-Talk: the batch's audio windows go to the DiT too
        from svi_jax.talk_data import TalkConditioner

        return TalkConditioner(cond)
    return cond


# ------------------------------------------------------------------------------------------------ data


def make_data(config, workdir: str, host_id: int | None = None, num_hosts: int | None = None):
    """The training stream: a latent cache, or a built video dataset (built from ``data.videos`` -- or from
    ``data.synthetic`` generated clips -- into ``<workdir>/dataset`` on first use)."""
    from svi_jax.data import builder
    from svi_jax.data.loader import ClipLoader

    d = config.data
    if config.model.get("multitalk", False):    # SVI-Talk: talking-head videos with their audio features
        from svi_jax.talk_data import make_talk_data

        return make_talk_data(config, workdir, host_id=host_id, num_hosts=num_hosts)
    if d.get("cache", ""):
        from svi_jax.data import cache as cache_mod

        return cache_mod.LatentLoader(d.cache, config=d, host_id=host_id, num_hosts=num_hosts)
    dataset = d.dataset or os.path.join(workdir, "dataset")
    if not _is_built(dataset):
        videos = d.videos
        if not videos:
            if not d.synthetic:
                raise ValueError("no training data: set config.data.videos (a folder of videos), config.data.dataset "
                                 "(a built dataset) or config.data.cache (a latent cache)")
            from svi_jax.data import scroll

            videos = os.path.join(workdir, "videos")
            if not os.path.isdir(videos):
                log.info("generating %d synthetic scrolling clips into %s", d.synthetic, videos)
                scroll.write_dataset(videos, num_videos=int(d.synthetic), num_frames=max(int(d.num_frames), 17),
                                     height=int(d.height), width=int(d.width), seed=int(d.seed))
        log.info("building the dataset %s from %s", dataset, videos)
        builder.build_dataset(videos, dataset, clip_frames=int(d.num_frames))
    return ClipLoader(dataset, d, host_id=host_id, num_hosts=num_hosts)


def _is_built(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "summary.json"))
