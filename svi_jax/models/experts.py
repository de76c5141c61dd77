"""Wan2.2-A14B's two experts: a high-noise and a low-noise DiT of the same shape, switched at a timestep boundary.

Both are instances of :class:`svi_jax.models.dit.DiT` (the Wan2.1 code path; the Wan2.2 I2V experts differ only by
config: ``image_embedding=False``, no CLIP branch). The high-noise expert runs while ``t >= boundary * 1000``, the
low-noise expert afterwards (Wan2.2 ``image2video.py`` ``_prepare_model_for_timestep``; SVI 2.0 Pro switches when
``t < 0.875 * 1000``, ``wan_video_svi_pro.py`` L226, L293).

On disk (``convert/from_torch.py wan22``): ``DIR/config.json`` of kind ``dit_experts`` naming the two DiT
directories ``DIR/high`` and ``DIR/low`` and the base model's own boundary.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from svi_jax.models.dit import DiT

EXPERTS = ("high", "low")

#: Wan2.2's own boundaries (wan/configs/wan_{i2v,t2v}_A14B.py) and SVI 2.0 Pro's (wan_video_svi_pro.py L226).
WAN22_BOUNDARY = {"i2v": 0.900, "t2v": 0.875}
SVI_PRO_BOUNDARY = 0.875


@dataclasses.dataclass
class DiTExperts:
    """``high`` / ``low``: :class:`DiT`; ``boundary``: the base model's switch ratio (t = boundary * 1000)."""

    high: DiT
    low: DiT
    boundary: float

    def __post_init__(self):
        a, b = self.high.config, self.low.config
        for f in ("model_type", "dim", "num_layers", "num_heads", "ffn_dim", "in_dim", "out_dim", "text_dim",
                  "patch_size", "image_embedding"):
            if getattr(a, f) != getattr(b, f):
                raise ValueError(f"the two experts differ in {f}: high {getattr(a, f)!r}, low {getattr(b, f)!r}")
        if not 0.0 < float(self.boundary) < 1.0:
            raise ValueError(f"boundary must be in (0, 1), got {self.boundary}")

    @property
    def config(self):
        return self.high.config

    def expert(self, t: float) -> DiT:
        """The expert that runs at timestep ``t`` (0..1000)."""
        return self.high if float(t) >= float(self.boundary) * 1000.0 else self.low

    def __getitem__(self, name: str) -> DiT:
        if name not in EXPERTS:
            raise KeyError(f"expert must be one of {EXPERTS}, got {name!r}")
        return getattr(self, name)

    @classmethod
    def from_dir(cls, directory: str, lora_high: Optional[str] = None, lora_low: Optional[str] = None,
                 lora_high_scale: float = 1.0, lora_low_scale: float = 1.0, dtype: Optional[str] = None,
                 **overrides) -> "DiTExperts":
        from svi_jax.model_dirs import CheckpointError, read_meta

        meta = read_meta(directory)
        if meta["kind"] != "dit_experts":
            raise CheckpointError(f"{directory} holds a {meta['kind']!r} model, not a two-expert DiT")
        c = meta["config"]
        high = DiT.from_dir(os.path.join(directory, c["high"]), lora=lora_high, lora_scale=lora_high_scale,
                            dtype=dtype, **overrides)
        low = DiT.from_dir(os.path.join(directory, c["low"]), lora=lora_low, lora_scale=lora_low_scale,
                           dtype=dtype, **overrides)
        return cls(high, low, float(c["boundary"]))


def write_meta(directory: str, boundary: float, source: dict) -> str:
    """``DIR/config.json`` of a two-expert directory whose experts are in ``DIR/high`` and ``DIR/low``."""
    from svi_jax.model_dirs import FORMAT_VERSION

    meta = {"kind": "dit_experts", "format_version": FORMAT_VERSION,
            "config": {"high": "high", "low": "low", "boundary": float(boundary), "source": source}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return directory
