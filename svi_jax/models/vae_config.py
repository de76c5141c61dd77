"""The Wan2.1 VAE's configuration and latent statistics (see :mod:`svi_jax.models.vae`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from svi_jax.models.layers import dtype_of

Dtype = Any

#: Wan2.1's per-channel latent statistics (``wan/modules/vae.py``, diffusers ``AutoencoderKLWan``).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

#: Video frames per encode step after the first frame (fixed by Wan's training).
ENCODE_FRAMES_PER_CHUNK = 4

VIDEO_AXES = ("batch", "frames", "height", "width", "channels")

# Fields of VAEConfig that describe the architecture (stored with the weights); the others are runtime options.
_ARCH_FIELDS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample",
                "in_channels", "out_channels", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture (Wan's names, incl. its spelling ``temperal``) plus runtime options.

    Runtime options: ``dtype`` (compute dtype; params stay as stored, norms run in float32), ``attention``
    (see :func:`svi_jax.models.layers.attention`), and spatial tiling: when ``tiling`` is on and the input is
    larger than one tile, the video is processed in overlapping tiles of ``tile_sample_min_*`` pixels every
    ``tile_sample_stride_*`` pixels, blended linearly over the overlap (as diffusers' ``enable_tiling``).
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    # runtime options
    dtype: str = "float32"
    attention: str = "auto"
    tiling: bool = False
    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def __post_init__(self):
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temperal_downsample", tuple(bool(b) for b in self.temperal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                             f"got {self.temperal_downsample}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim = {self.z_dim} entries, "
                             f"got {len(self.latents_mean)}/{len(self.latents_std)}")
        if self.tile_sample_stride_height > self.tile_sample_min_height or \
                self.tile_sample_stride_width > self.tile_sample_min_width:
            raise ValueError("tile strides must not exceed the tile sizes")
        if self.tile_sample_min_height % self.spatial_factor or self.tile_sample_min_width % self.spatial_factor \
                or self.tile_sample_stride_height % self.spatial_factor \
                or self.tile_sample_stride_width % self.spatial_factor:
            raise ValueError(f"tile sizes and strides must be multiples of {self.spatial_factor}")
        dtype_of(self.dtype)

    def compute_config(self) -> "VAEConfig":
        """This config with the tiling options reset: what the compiled chunk functions depend on."""
        return dataclasses.replace(self, tiling=False, tile_sample_min_height=256, tile_sample_min_width=256,
                                   tile_sample_stride_height=192, tile_sample_stride_width=192)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    def arch_dict(self) -> dict:
        """The architecture fields (what ``config.json`` stores)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k in _ARCH_FIELDS}

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "VAEConfig":
        """From our ``config.json`` or a diffusers ``AutoencoderKLWan`` config (unknown keys are checked/ignored)."""
        d = dict(d)
        if d.get("is_residual"):
            raise ValueError("is_residual=True is the Wan2.2 VAE, which is not supported (Wan2.1 only)")
        if d.get("attn_scales"):
            raise ValueError(f"attn_scales={d['attn_scales']} is not supported (Wan2.1 uses [])")
        if d.get("patch_size") not in (None, 1):
            raise ValueError(f"patch_size={d['patch_size']} is not supported (Wan2.1 uses none)")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.update(overrides)
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown VAE option(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**kw)


def wan21_config(**overrides) -> VAEConfig:
    """The Wan2.1 VAE: base_dim 96, z_dim 16, dim_mult (1,2,4,4), 2 res blocks, temporal down (F,T,T)."""
    return VAEConfig(**overrides)


