"""What feeds the train step: batches -> model inputs, with the frozen encoders of :mod:`svi_jax.encoders`.

``make_conditioner(config)`` returns an object with

* ``params``: ``{'vae': ..., 't5': ..., 'clip': ...}`` (frozen; they live in the train state next to the DiT),
* ``prepare(params, batch, key)`` -> ``{x0, y, context, clip_fea}``: pure and jittable, run *inside* the train step
  (the official code also encodes every clip every step; a latent cache skips it, see ``svi_jax.data``),
* ``device_batch(host_batch)``: tokenises captions on the host and turns arrays into device arrays.

Variants: :class:`LatentConditioner` (a latent cache: no encoders), :class:`ProConditioner` (SVI 2.0 Pro on
Wan2.2: VAE + UMT5, the Pro ``y``; see :mod:`svi_jax.pro_train`), :class:`TalkConditioner` (SVI-Talk: the audio
windows of the batch too).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from svi_jax.conditioning import build_y, pro_y16
from svi_jax.encoders import FrozenEncoders, make_encoders


class PixelConditioner:
    """Encodes pixel batches (video, cond, first_frame, caption) with the frozen VAE, UMT5 and CLIP."""

    def __init__(self, config, encoders: FrozenEncoders):
        self.config = config
        self.encoders = encoders
        self.codec, self.t5_cfg, self.clip_cfg = encoders.codec, encoders.t5_cfg, encoders.clip_cfg
        self.tokenizer = encoders.tokenizer
        self.params = encoders.params
        self._vae = encoders.latents
        self.i2v = config.model.model_type == "i2v"
        self.num_frames = int(config.data.num_frames)

    def prepare(self, params, batch, key):
        enc = self.encoders
        if self.i2v:
            cond = batch["cond"]
            hp = float(self.config.get("baseline", {}).get("handcrafted_p", 0.0))
            if hp > 0:   # the Tab. 7 baseline: handcrafted degradations of the condition frames
                from svi_jax.augment import degrade

                cond, _ = degrade(key, cond, float(self.config.baseline.get("handcrafted_strength", 1.0)), hp)
            x0, y = enc.latents_and_y(params["vae"], batch["video"], cond, self.num_frames)   # one encode of both
        else:
            x0, y = enc.latents(params["vae"], batch["video"]), None
        out = {"x0": x0, "y": y, "context": enc.context(params["t5"], batch["ids"], batch["ids_mask"]),
               "clip_fea": None}
        if self.i2v:
            out["clip_fea"] = enc.clip_tokens(params["clip"], batch["first_frame"])
        if "pose" in batch:
            out["pose"] = batch["pose"]
        return out

    def device_batch(self, batch: dict) -> dict:
        ids, mask = self.encoders.tokenize(batch["caption"])
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


class ProConditioner(PixelConditioner):
    """Pixel batches (``video``, ``anchor``, caption) -> ``{x0, y, context, clip_fea=None}`` with the Pro ``y``
    (``y16 = [VAE(anchor), x0[1:1+n], zeros]``, or with ``pro.p_first_clip`` the clip-0 form ``[x0[:1], zeros]``)."""

    def __init__(self, config, encoders: FrozenEncoders):
        super().__init__(config, encoders)
        self.n_motion = int(config.pro.motion_latents)
        self.p_first = float(config.pro.get("p_first_clip", 0.0))

    def prepare(self, params, batch, key):
        x0 = self._vae(params["vae"], batch["video"])
        anchor = self._vae(params["vae"], batch["anchor"][:, None])            # [B, 1, h, w, C]
        f = x0.shape[1]
        y16 = pro_y16(anchor, x0[:, 1:1 + self.n_motion], f)
        if self.p_first > 0:                                                   # the clip-0 form [x0[:1], zeros]
            first = jax.random.uniform(key, (x0.shape[0],)) < self.p_first
            y16 = jnp.where(first[:, None, None, None, None], pro_y16(x0[:, :1], None, f), y16)
        ctx = self.encoders.context(params["t5"], batch["ids"], batch["ids_mask"])
        return {"x0": x0, "y": build_y(y16, self.num_frames), "context": ctx, "clip_fea": None}

    def device_batch(self, batch: dict) -> dict:
        if "anchor" not in batch:
            raise ValueError("SVI 2.0 Pro training needs an anchor frame per clip: set config.data.anchor='outside'")
        ids, mask = self.encoders.tokenize(batch["caption"])
        return {"ids": jnp.asarray(ids, jnp.int32), "ids_mask": jnp.asarray(mask, jnp.int32),
                "video": jnp.asarray(batch["video"], jnp.float32),
                "anchor": jnp.asarray(batch["anchor"], jnp.float32)}


class TalkConditioner:
    """:class:`PixelConditioner` plus the audio windows of the batch (``inputs['audio']``)."""

    def __init__(self, base):
        self.base = base
        self.params = base.params

    def prepare(self, params, batch, key):
        out = self.base.prepare(params, batch, key)
        out["audio"] = (batch["audio_first"], batch["audio_later"])
        return out

    def device_batch(self, batch: dict) -> dict:
        out = self.base.device_batch(batch)
        out["audio_first"] = jnp.asarray(batch["audio_first"], jnp.float32)
        out["audio_later"] = jnp.asarray(batch["audio_later"], jnp.float32)
        return out


def make_pro_conditioner(config) -> ProConditioner:
    """The frozen VAE + UMT5 (no CLIP in Wan2.2) around :class:`ProConditioner`."""
    enc = make_encoders(config, image=False)
    enc.check_widths(config.model.text_dim, config.model.out_dim)
    return ProConditioner(config, enc)


def make_conditioner(config, workdir: str | None = None):
    """Encoders from ``config.checkpoints`` or a seeded random init of ``config.encoders`` (tiny configs)."""
    del workdir
    if config.data.get("cache", ""):
        return LatentConditioner(config)
    if config.get("pro", None) is not None:     # SVI 2.0 Pro on Wan2.2: VAE + UMT5, the Pro y (svi_jax.pro_train)
        return make_pro_conditioner(config)
    enc = make_encoders(config)
    if enc.clip_cfg is not None:
        enc.check_image_width(config.model.image_dim)
    enc = enc.in_dtype(config.encoders.get("dtype", "float32"))   # the frozen encoders in bf16 (their own program)
    enc.check_widths(config.model.text_dim, config.model.out_dim)
    cond = PixelConditioner(config, enc)
    if config.model.get("multitalk", False):    # SVI-Talk: the batch's audio windows go to the DiT too
        return TalkConditioner(cond)
    return cond
