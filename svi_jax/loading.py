"""``svi_jax.load(path)``: open any converted model directory by the kind written in its config.json."""
from __future__ import annotations

import importlib

from svi_jax.model_dirs import CheckpointError, read_meta

# kind -> "module:attribute" of a callable ``(directory, **kwargs) -> model object``
_LOADERS = {
    "dit": "svi_jax.models.dit:DiT.from_dir",
    "dit_experts": "svi_jax.models.experts:DiTExperts.from_dir",
    "vae": "svi_jax.models.vae:VAE.from_dir",
    "t5": "svi_jax.models.t5:T5Encoder.from_dir",
    "clip": "svi_jax.models.clip:CLIPVision.from_dir",
    "wav2vec2": "svi_jax.models.wav2vec2:Wav2Vec2Encoder.from_dir",
}


def load(path: str, **kwargs):
    """Load a model directory written by ``convert/from_torch.py`` (or by ``save``) and return its object.

    * DiT: ``load(dir, lora=None, lora_scale=1.0, dtype=None)`` -> :class:`svi_jax.models.dit.DiT`
    * Wan2.2-A14B (two experts): ``load(dir, lora_high=None, lora_low=None, lora_high_scale=1.0,
      lora_low_scale=1.0)`` -> :class:`svi_jax.models.experts.DiTExperts` (``.high``, ``.low``, ``.boundary``)
    * VAE: -> object with ``encode``, ``decode``, ``normalize``, ``denormalize``
    * UMT5: -> object with ``encode(texts)``, ``encode_ids(ids, mask)``
    * CLIP: -> object with ``encode(images)``
    """
    meta = read_meta(path)
    kind = meta["kind"]
    if kind not in _LOADERS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; known: {sorted(_LOADERS)}")
    mod_name, attr = _LOADERS[kind].split(":")
    obj = importlib.import_module(mod_name)
    for a in attr.split("."):
        obj = getattr(obj, a)
    return obj(path, **kwargs)
