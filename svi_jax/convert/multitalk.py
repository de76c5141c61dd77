"""SVI-Talk: the MultiTalk audio layers (``multitalk.safetensors``) converted together with the Wan2.1-I2V base.

The official file sits beside the Wan2.1-I2V-14B-480P shards and is loaded as one more shard (its keys are
``audio_proj.{proj1,proj1_vf,proj2,proj3,norm}.*``, ``blocks.i.audio_cross_attn.{q_linear,kv_linear,proj}.*``,
``blocks.i.norm_x.*``). The shards' ``*.index.json`` does not list it, so it is added here explicitly (``--multitalk``)
or found as ``SRC/multitalk.safetensors``. The DiT converter maps every key with its generic rule (Linear ->
transposed kernel, LayerNorm weight -> scale), so nothing else is MultiTalk-specific but the config inference.
"""
from __future__ import annotations

import logging
import os

from svi_jax.convert.common import ConversionError, TensorSource

log = logging.getLogger(__name__)

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "pipe.dit.", "dit.")
# the official fixed values (wan_video_dit.py L454-470): window 5, VAE time scale 4, 12 wav2vec2 layers of 768
_DEFAULTS = {"audio_window": 5, "audio_vae_scale": 4, "audio_layers": 12, "audio_in_dim": 768}


class UnionSource:
    """Read access over several :class:`TensorSource` (a key may live in exactly one of them)."""

    def __init__(self, sources):
        self.sources = list(sources)
        self.src = " + ".join(s.src for s in self.sources)
        self.config = next((s.config for s in self.sources if s.config), None)
        self._owner = {}
        for s in self.sources:
            for k in s.keys():
                if k in self._owner:
                    raise ConversionError(f"key {k!r} is in both {self._owner[k].src} and {s.src}")
                self._owner[k] = s

    def keys(self):
        return sorted(self._owner)

    def __contains__(self, key):
        return key in self._owner

    def _get_src(self, key):
        if key not in self._owner:
            raise ConversionError(f"missing key {key!r} in {self.src}")
        return self._owner[key]

    def shape(self, key):
        return self._get_src(key).shape(key)

    def is_half(self, key):
        return self._get_src(key).is_half(key)

    def get(self, key):
        return self._get_src(key).get(key)


def with_multitalk(src: TensorSource, multitalk: str | None):
    """``src`` plus the MultiTalk file (explicit, or ``SRC/multitalk.safetensors`` when not already in ``src``)."""
    if multitalk is None and os.path.isdir(src.src):
        cand = os.path.join(src.src, "multitalk.safetensors")
        if os.path.isfile(cand) and not any(k.startswith("audio_proj.") for k in src.keys()):
            multitalk = cand
            log.info("adding the MultiTalk audio layers from %s", cand)
    if multitalk is None:
        return src
    if not os.path.isfile(multitalk):
        raise ConversionError(f"MultiTalk file {multitalk} does not exist")
    extra = TensorSource(multitalk, strip_prefixes=_PREFIXES)
    if not any(k.startswith("audio_proj.") for k in extra.keys()):
        raise ConversionError(f"{multitalk} holds no 'audio_proj.*' keys: not a MultiTalk audio-layer file "
                              f"(first keys: {extra.keys()[:5]})")
    return UnionSource([src, extra])


def infer_audio_config(view, cfg_json: dict | None) -> dict:
    """The ``DiTConfig`` audio fields from the tensor shapes (window / layers / input width from ``config.json``
    keys of the same names if present, else the official 5 / 12 / 768, checked against ``proj1``)."""
    cfg_json = cfg_json or {}
    for k in ("audio_proj.proj1.weight", "audio_proj.proj1_vf.weight", "audio_proj.proj3.weight",
              "audio_proj.norm.weight", "blocks.0.audio_cross_attn.kv_linear.weight"):
        if not view.has(k):
            raise ConversionError(f"missing MultiTalk key {k!r} in {view.src.src}")
    d = {k: int(cfg_json.get(k, v)) for k, v in _DEFAULTS.items()}
    hidden, in1 = view.shape("audio_proj.proj1.weight")
    _, in_vf = view.shape("audio_proj.proj1_vf.weight")
    (audio_dim,) = view.shape("audio_proj.norm.weight")
    per_step = d["audio_layers"] * d["audio_in_dim"]
    want1, want_vf = d["audio_window"] * per_step, (d["audio_window"] + d["audio_vae_scale"] - 1) * per_step
    if (in1, in_vf) != (want1, want_vf):
        raise ConversionError(
            f"audio_proj.proj1 / proj1_vf take {in1} / {in_vf} inputs, expected {want1} / {want_vf} for window "
            f"{d['audio_window']}, vae scale {d['audio_vae_scale']}, {d['audio_layers']} layers x "
            f"{d['audio_in_dim']}: put audio_window / audio_vae_scale / audio_layers / audio_in_dim in a "
            f"config.json beside the weights")
    tokens = view.shape("audio_proj.proj3.weight")[0] // audio_dim
    return dict(multitalk=True, audio_hidden=int(hidden), audio_tokens=int(tokens), audio_dim=int(audio_dim), **d)
