"""The Wan2.1 causal 3D VAE in Flax, with streaming (chunked, cached) encode and decode.

Layout is channels-last: video ``[B, T, H, W, 3]`` in [-1, 1] <-> latents ``[B, 1 + (T-1)/4, H/8, W/8, 16]``.

Streaming (as in Wan): time is processed chunk by chunk -- the first frame alone, then 4 frames at a time for
encode (one latent frame at a time for decode). Every causal temporal convolution keeps the last frames of its
input in a *cache* (a Flax ``'cache'`` collection) that is carried from one chunk to the next, so memory does
not grow with the number of frames. Two jitted functions exist per (config, input shape): the first-chunk
function (which also differs in behaviour: the temporal down/upsampling convolutions skip the first frame, as in
Wan) and the step function, reused for every later chunk. Processing all later frames in one step (``chunk=None``)
gives the same result ("whole-sequence" processing).

The per-channel latent normalisation is a separate step: :meth:`VAE.normalize` / :meth:`VAE.denormalize`.
See ``docs/vae.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.models.layers import Linear, attention, dtype_of

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


# ------------------------------------------------------------------------------------------------ layers

def _conv_init(key, shape, dtype=jnp.float32):
    fan_in = int(np.prod(shape[:-1]))
    return jax.random.normal(key, shape, dtype) * (1.0 / math.sqrt(fan_in))


def _lp(init, names):
    return nn.with_logical_partitioning(init, names)


class WanRMSNorm(nn.Module):
    """Wan's ``RMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * scale`` over channels, in float32."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", _lp(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * (c ** 0.5) * scale.astype(jnp.float32)
        return y.astype(self.dtype)


def _conv2d(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class CausalConv3d(nn.Module):
    """3x3x3 convolution, causal in time (two past frames come from the cache), zero-padded by 1 in space.

    Computed as three 2-D convolutions over the time taps (about 2x faster than XLA:CPU's 3-D convolution).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        kernel = self.param("kernel", _lp(_conv_init, (None, None, None, "conv_in", "conv_out")),
                            (3, 3, 3, c, self.features), self.param_dtype)
        bias = self.param("bias", _lp(nn.initializers.zeros_init(), ("conv_out",)), (self.features,),
                          self.param_dtype)
        x = x.astype(self.dtype)
        cache = self.variable("cache", "x", jnp.zeros, (b, 2, h, w, c), self.dtype)
        xc = jnp.concatenate([cache.value.astype(self.dtype), x], axis=1)
        if self.is_mutable_collection("cache"):
            cache.value = xc[:, -2:]
        k = kernel.astype(self.dtype)
        y = None
        for dt in range(3):
            frames = xc[:, dt:dt + t].reshape(b * t, h, w, c)
            yi = _conv2d(frames, k[dt], (1, 1), ((1, 1), (1, 1)))
            y = yi if y is None else y + yi
        y = y.reshape(b, t, h, w, self.features) + bias.astype(self.dtype)
        return y


class Conv2d(nn.Module):
    """Per-frame 3x3 convolution (the spatial part of Wan's resampling)."""

    features: int
    stride: int = 1
    padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        kernel = self.param("kernel", _lp(_conv_init, (None, None, "conv_in", "conv_out")),
                            (3, 3, c, self.features), self.param_dtype)
        bias = self.param("bias", _lp(nn.initializers.zeros_init(), ("conv_out",)), (self.features,),
                          self.param_dtype)
        y = _conv2d(x.astype(self.dtype).reshape(b * t, h, w, c), kernel.astype(self.dtype),
                    (self.stride, self.stride), tuple(self.padding))
        y = y + bias.astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class TimeConv(nn.Module):
    """The temporal (3, 1, 1) convolution of Wan's 3-D resampling, with its streaming cache.

    * ``down``: stride 2 over ``[last frame of the previous chunk, this chunk]``; on the first chunk the single
      frame passes through unchanged (and becomes the cache).
    * ``up``: stride 1, causal (two cached frames); on the first chunk it is skipped and the cache starts at zero.
    """

    features: int
    mode: str  # "down" | "up"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        b, t, h, w, c = x.shape
        kernel = self.param("kernel", _lp(_conv_init, (None, "conv_in", "conv_out")), (3, c, self.features),
                            self.param_dtype)
        bias = self.param("bias", _lp(nn.initializers.zeros_init(), ("conv_out",)), (self.features,),
                          self.param_dtype)
        x = x.astype(self.dtype)
        n_cache = 1 if self.mode == "down" else 2
        cache = self.variable("cache", "x", jnp.zeros, (b, n_cache, h, w, c), self.dtype)
        mutable = self.is_mutable_collection("cache")
        if first:
            if self.mode == "down" and mutable:
                cache.value = x[:, -1:]
            return None
        xc = jnp.concatenate([cache.value.astype(self.dtype), x], axis=1)
        k = kernel.astype(self.dtype)
        if self.mode == "down":
            if t % 2:
                raise ValueError(f"temporal downsampling needs an even number of frames per chunk, got {t}")
            n = t // 2
            taps = [xc[:, dt:dt + 2 * n - 1:2] for dt in range(3)]
            if mutable:
                cache.value = x[:, -1:]
        else:
            taps = [xc[:, dt:dt + t] for dt in range(3)]
            if mutable:
                cache.value = xc[:, -2:]
        y = sum(jnp.einsum("bthwc,cd->bthwd", tap, k[dt]) for dt, tap in enumerate(taps))
        return y + bias.astype(self.dtype)


class Resample(nn.Module):
    """Wan's ``Resample``: spatial 2x down/up (3x3 conv), optionally with temporal 2x (cached time conv)."""

    mode: str  # downsample2d | downsample3d | upsample2d | upsample3d
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        b, t, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.mode == "upsample3d":
            y = TimeConv(2 * c, "up", name="time_conv", **kw)(x, first)
            if y is not None:  # channels (2, C) -> frames (2t, 2t+1)
                x = einops.rearrange(y, "b t h w (s c) -> b (t s) h w c", s=2)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact, integer factor
            x = Conv2d(self.out_dim, 1, ((1, 1), (1, 1)), name="resample", **kw)(x)
        else:
            x = Conv2d(self.out_dim, 2, ((0, 1), (0, 1)), name="resample", **kw)(x)
        if self.mode == "downsample3d":
            y = TimeConv(c, "down", name="time_conv", **kw)(x, first)
            if y is not None:
                x = y
        return x


class ResidualBlock(nn.Module):
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if x.shape[-1] != self.out_dim:
            h = Linear(self.out_dim, axes=("conv_in", "conv_out"), kernel_init=_conv_init, name="conv_shortcut",
                       **kw)(x)
        else:
            h = x.astype(self.dtype)
        y = CausalConv3d(self.out_dim, name="conv1", **kw)(nn.silu(WanRMSNorm(name="norm1", **kw)(x)))
        y = CausalConv3d(self.out_dim, name="conv2", **kw)(nn.silu(WanRMSNorm(name="norm2", **kw)(y)))
        return nn.with_logical_constraint(y + h, VIDEO_AXES)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (over its H*W positions)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = WanRMSNorm(name="norm", **kw)(x)
        qkv = Linear(3 * c, axes=("conv_in", "conv_out"), kernel_init=_conv_init, name="to_qkv", **kw)(y)
        q, k, v = (einops.rearrange(a, "b t h w c -> (b t) (h w) 1 c") for a in jnp.split(qkv, 3, axis=-1))
        o = attention(q, k, v, impl=self.impl)
        o = einops.rearrange(o, "(b t) (h w) 1 c -> b t h w c", b=b, h=h)
        o = Linear(c, axes=("conv_in", "conv_out"), kernel_init=_conv_init, name="proj", **kw)(o)
        return x.astype(self.dtype) + o


class MidBlock(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResidualBlock(c, name="resnets_0", **kw)(x)
        x = AttentionBlock(impl=self.impl, name="attentions_0", **kw)(x)
        return ResidualBlock(c, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    cfg: VAEConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        cfg = self.cfg
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=self.param_dtype)
        dims = [cfg.base_dim * u for u in (1,) + cfg.dim_mult]
        x = CausalConv3d(dims[0], name="conv_in", **kw)(x)
        idx = 0
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, name=f"down_blocks_{idx}", **kw)(x)
                idx += 1
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                x = Resample(mode, out_dim, name=f"down_blocks_{idx}", **kw)(x, first)
                idx += 1
        x = MidBlock(impl=cfg.attention, name="mid_block", **kw)(x)
        x = nn.silu(WanRMSNorm(name="norm_out", **kw)(x))
        return CausalConv3d(2 * cfg.z_dim, name="conv_out", **kw)(x)


class UpBlock(nn.Module):
    out_dim: int
    num_res_blocks: int
    upsample_mode: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for r in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, name=f"resnets_{r}", **kw)(x)
        if self.upsample_mode is not None:
            x = Resample(self.upsample_mode, self.out_dim // 2, name="upsamplers_0", **kw)(x, first)
        return x


class Decoder(nn.Module):
    cfg: VAEConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, first: bool):
        cfg = self.cfg
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=self.param_dtype)
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
        x = CausalConv3d(dims[0], name="conv_in", **kw)(z)
        x = MidBlock(impl=cfg.attention, name="mid_block", **kw)(x)
        n = len(cfg.dim_mult)
        for i, out_dim in enumerate(dims[1:]):
            mode = None
            if i != n - 1:
                mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
            x = UpBlock(out_dim, cfg.num_res_blocks, mode, name=f"up_blocks_{i}", **kw)(x, first)
        x = nn.silu(WanRMSNorm(name="norm_out", **kw)(x))
        return CausalConv3d(cfg.out_channels, name="conv_out", **kw)(x)


class WanVAE(nn.Module):
    """Params: ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder`` (diffusers' module names)."""

    cfg: VAEConfig
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=dtype_of(self.cfg.dtype), param_dtype=self.param_dtype)
        z = self.cfg.z_dim
        self.encoder = Encoder(self.cfg, self.param_dtype)
        self.quant_conv = Linear(2 * z, axes=("conv_in", "conv_out"), kernel_init=_conv_init, **kw)
        self.post_quant_conv = Linear(z, axes=("conv_in", "conv_out"), kernel_init=_conv_init, **kw)
        self.decoder = Decoder(self.cfg, self.param_dtype)

    def encode_chunk(self, x, first: bool):
        """Video chunk ``[B, T, H, W, C]`` -> posterior mean ``[B, T', H/8, W/8, z]`` (float32)."""
        x = nn.with_logical_constraint(x, VIDEO_AXES)
        moments = self.quant_conv(self.encoder(x, first))
        return moments[..., :self.cfg.z_dim].astype(jnp.float32)

    def decode_chunk(self, z, first: bool):
        """Latent chunk ``[B, L, h, w, z]`` -> video chunk (float32, not clamped)."""
        z = nn.with_logical_constraint(z, VIDEO_AXES)
        return self.decoder(self.post_quant_conv(z), first).astype(jnp.float32)

    def __call__(self, x, z, first: bool = True):
        return self.encode_chunk(x, first), self.decode_chunk(z, first)


# ------------------------------------------------------------------------------------- functional API

def _init_inputs(cfg: VAEConfig):
    s = cfg.spatial_factor
    return jnp.zeros((1, 1, s, s, cfg.in_channels), jnp.float32), jnp.zeros((1, 1, 1, 1, cfg.z_dim), jnp.float32)


def _boxed_init(cfg: VAEConfig, key):
    x, z = _init_inputs(cfg)
    return WanVAE(cfg).init(key, x, z, True)["params"]


def init_params(cfg: VAEConfig, seed: int = 0):
    """Random params (plain arrays): kernels ~ N(0, 1/fan_in), norm scales 1, biases 0.

    Drawn with numpy from the shapes (jitting Flax's init costs ~30 s of XLA compilation for the RNG graph).
    """
    rng = np.random.default_rng(seed)

    def draw(path, sds):
        leaf = path[-1].key
        if leaf == "scale":
            return jnp.ones(sds.shape, sds.dtype)
        if leaf == "bias":
            return jnp.zeros(sds.shape, sds.dtype)
        fan_in = int(np.prod(sds.shape[:-1]))
        return jnp.asarray(rng.standard_normal(sds.shape, dtype=np.float32) / math.sqrt(fan_in), sds.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def param_shapes(cfg: VAEConfig):
    """Tree of ``jax.ShapeDtypeStruct`` of the params for ``cfg`` (no computation)."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.PRNGKey(0)))


def param_logical_axes(cfg: VAEConfig):
    """Tree of logical-axis ``PartitionSpec``s of the params (for a sharding rules table)."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.PRNGKey(0)))


def _apply(params, x, cache, cfg, first, method):
    variables = {"params": params}
    if cache is not None:
        variables["cache"] = cache
    out, mut = WanVAE(cfg).apply(variables, x, first, method=method, mutable=["cache"])
    return out, mut["cache"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_first(params, x, *, cfg):
    """First video frame ``[B, 1, H, W, C]`` -> (first latent frame, cache)."""
    return _apply(params, x, None, cfg, True, WanVAE.encode_chunk)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def encode_step(params, x, cache, *, cfg):
    """Next ``4k`` video frames and the cache -> (``k`` latent frames, new cache)."""
    return _apply(params, x, cache, cfg, False, WanVAE.encode_chunk)


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_first(params, z, *, cfg):
    """First latent frame ``[B, 1, h, w, z]`` -> (first video frame, unclamped, cache)."""
    return _apply(params, z, None, cfg, True, WanVAE.decode_chunk)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params, z, cache, *, cfg):
    """Next ``k`` latent frames and the cache -> (``4k`` video frames, unclamped, new cache)."""
    return _apply(params, z, cache, cfg, False, WanVAE.decode_chunk)


def encode_video(params, video, *, cfg: VAEConfig, chunk: int = 1):
    """Pure and jit-able (for use inside a jitted step): ``video [B, 1+4k, H, W, C]`` -> posterior mean
    (un-normalised). The first frame, then ``4*chunk`` frames per ``lax.scan`` iteration with the cache as the
    carry: one compiled chunk body for every chunk. The outputs are stacked on the device."""
    return _scan_chunks(params, video, cfg, WanVAE.encode_chunk, ENCODE_FRAMES_PER_CHUNK * chunk)


def decode_video(params, latents, *, cfg: VAEConfig, chunk: int = 1, clamp: bool = True):
    """Pure and jit-able: un-normalised ``latents [B, L, h, w, z]`` -> video ``[B, 1+4(L-1), 8h, 8w, C]``
    (clamped to [-1, 1] unless ``clamp=False``); ``chunk`` latent frames per ``lax.scan`` iteration."""
    x = _scan_chunks(params, latents, cfg, WanVAE.decode_chunk, chunk)
    return jnp.clip(x, -1.0, 1.0) if clamp else x


def _scan_chunks(params, x, cfg, method, per_step: int):
    y0, cache = _apply(params, x[:, :1], None, cfg, True, method)
    rest = x[:, 1:]
    if rest.shape[1] == 0:
        return y0
    if rest.shape[1] % per_step:
        raise ValueError(f"{rest.shape[1]} frames after the first are not a multiple of the step ({per_step})")
    chunks = einops.rearrange(rest, "b (n k) h w c -> n b k h w c", k=per_step)

    def body(c, xs):
        y, c = _apply(params, xs, c, cfg, False, method)
        return c, y

    _, ys = jax.lax.scan(body, cache, chunks)
    return jnp.concatenate([y0, einops.rearrange(ys, "n b k h w c -> b (n k) h w c")], axis=1)


def _stream(first_fn, step_fn, x, n_first: int, per_step: int, write: Callable[[int, Any], None],
            progress: bool, desc: str):
    """Run ``first_fn`` on ``x[:, :n_first]`` then ``step_fn`` on consecutive ``per_step`` slices of time.

    ``write(index, out)`` receives each chunk's output (fetched one step late so the host copy overlaps the next
    step's compute). Returns nothing: outputs go to ``write``.
    """
    t = x.shape[1]
    starts = list(range(n_first, t, per_step))
    out, cache = first_fn(jnp.asarray(x[:, :n_first]))
    pending = (0, out)
    bar = None
    if progress and len(starts) > 2:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc=desc, unit="chunk", leave=False, dynamic_ncols=True)
    for i, s in enumerate(starts):
        out, cache = step_fn(jnp.asarray(x[:, s:s + per_step]), cache)
        write(*pending)
        pending = (i + 1, out)
        if bar is not None:
            bar.update(1)
    write(*pending)
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------------- the model

class VAE:
    """Wan2.1 VAE with streaming encode/decode. Inputs may be numpy or jax arrays; outputs are numpy (host).

    * ``encode(video [B, T, H, W, 3] in [-1, 1])`` -> posterior mean ``[B, 1+(T-1)/4, H/8, W/8, 16]``
      (un-normalised; apply :meth:`normalize` for the DiT's latent space). ``T`` must be ``1 + 4k``.
    * ``decode(latents)`` -> video ``[B, 1+4(L-1), 8h, 8w, 3]`` clamped to [-1, 1].
    * ``iter_decode(latents)`` yields the decoded video chunk by chunk (first frame, then 4 frames per latent
      frame) so arbitrarily long videos can be written out without holding them.

    ``chunk`` = latent frames per step after the first (1 = Wan's streaming; ``None`` = all in one step, i.e.
    whole-sequence processing; both give the same result). Compiled functions are shared by all instances with
    the same config and input shapes.
    """

    def __init__(self, config: VAEConfig, params):
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)

    # ---- construction / IO
    @classmethod
    def from_dir(cls, directory: str, **kwargs) -> "VAE":
        """Load a directory written by ``convert/from_torch.py vae`` or :meth:`save`. ``kwargs`` override
        :class:`VAEConfig` fields (runtime options such as ``dtype``, ``tiling``, ``tile_sample_min_height``)."""
        from svi_jax.checkpoint import CheckpointError, load_params, read_meta

        meta = read_meta(directory)
        if meta["kind"] != "vae":
            raise CheckpointError(f"{directory} holds a {meta['kind']!r} model, not a VAE")
        cfg = VAEConfig.from_dict(meta["config"], **kwargs)
        params = load_params(directory, param_shapes(cfg), what=f"VAE checkpoint {directory}")
        return cls(cfg, params)

    @classmethod
    def random(cls, config: VAEConfig | None = None, seed: int = 0) -> "VAE":
        """A VAE with random weights (tests, benchmarks)."""
        config = config or wan21_config()
        return cls(config, init_params(config, seed))

    def save(self, directory: str) -> str:
        from svi_jax.checkpoint import save_model

        return save_model(directory, "vae", self.config.arch_dict(), self.params)

    def with_options(self, **kwargs) -> "VAE":
        """Same weights, other runtime options (``dtype``, ``tiling``, tile sizes, ``attention``)."""
        return VAE(dataclasses.replace(self.config, **kwargs), self.params)

    # ---- latent normalisation (Wan: z_norm = (mu - mean) / std)
    def normalize(self, z):
        """Posterior mean -> the normalised latent space the DiT works in: ``(z - mean) / std`` per channel."""
        xp = jnp if isinstance(z, jax.Array) else np
        mean = xp.asarray(self.config.latents_mean, dtype=np.float32)
        std = xp.asarray(self.config.latents_std, dtype=np.float32)
        return (z - mean) / std

    def denormalize(self, z):
        """Inverse of :meth:`normalize`: ``z * std + mean`` (apply before :meth:`decode`)."""
        xp = jnp if isinstance(z, jax.Array) else np
        mean = xp.asarray(self.config.latents_mean, dtype=np.float32)
        std = xp.asarray(self.config.latents_std, dtype=np.float32)
        return z * std + mean

    # ---- shapes
    def latent_shape(self, video_shape) -> tuple[int, ...]:
        b, t, h, w, _ = video_shape
        s = self.config.spatial_factor
        return (b, 1 + (t - 1) // ENCODE_FRAMES_PER_CHUNK * (ENCODE_FRAMES_PER_CHUNK // self.config.temporal_factor),
                h // s, w // s, self.config.z_dim)

    def video_shape(self, latent_shape) -> tuple[int, ...]:
        b, l, h, w, _ = latent_shape
        s = self.config.spatial_factor
        return (b, 1 + (l - 1) * self.config.temporal_factor, h * s, w * s, self.config.out_channels)

    def _check_video(self, video):
        chex.assert_rank(video, 5)
        cfg = self.config
        b, t, h, w, c = video.shape
        if c != cfg.in_channels:
            raise ValueError(f"video must be [B, T, H, W, {cfg.in_channels}], got {tuple(video.shape)}")
        if (t - 1) % ENCODE_FRAMES_PER_CHUNK:
            raise ValueError(f"encode needs 1 + {ENCODE_FRAMES_PER_CHUNK}k frames, got T={t}")
        s = cfg.spatial_factor
        if h % s or w % s:
            raise ValueError(f"H and W must be multiples of {s}, got {h}x{w}")

    def _check_latents(self, z):
        chex.assert_rank(z, 5)
        if z.shape[-1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, L, h, w, {self.config.z_dim}], got {tuple(z.shape)}")

    # ---- encode
    def encode(self, video, chunk: int | None = 1, progress: bool = True) -> np.ndarray:
        """Posterior mean (un-normalised) of ``video [B, T, H, W, 3]``, ``T = 1 + 4k``, values in [-1, 1]."""
        self._check_video(video)
        cfg = self.config
        h, w = video.shape[2:4]
        if cfg.tiling and (h > cfg.tile_sample_min_height or w > cfg.tile_sample_min_width):
            return self._tiled(video, encode=True, chunk=chunk, progress=progress)
        return self._encode_tile(video, chunk, progress)

    def _encode_tile(self, video, chunk, progress):
        cfg = self.config.compute_config()
        t = video.shape[1]
        out = np.empty(self.latent_shape(video.shape), np.float32)
        per_step = max((t - 1) if chunk is None else ENCODE_FRAMES_PER_CHUNK * chunk, 1)
        pos = [0]

        def write(i, y):
            y = np.asarray(y)
            out[:, pos[0]:pos[0] + y.shape[1]] = y
            pos[0] += y.shape[1]

        _stream(functools.partial(encode_first, self.params, cfg=cfg),
                functools.partial(encode_step, self.params, cfg=cfg),
                video, 1, per_step, write, progress, "VAE encode")
        assert pos[0] == out.shape[1], (pos[0], out.shape)
        return out

    # ---- decode
    def decode(self, latents, chunk: int | None = 1, clamp: bool = True, progress: bool = True) -> np.ndarray:
        """Video ``[B, 1+4(L-1), 8h, 8w, 3]`` (clamped to [-1, 1] unless ``clamp=False``) from un-normalised
        ``latents [B, L, h, w, 16]``."""
        self._check_latents(latents)
        cfg = self.config
        s = cfg.spatial_factor
        h, w = latents.shape[2:4]
        if cfg.tiling and (h > cfg.tile_sample_min_height // s or w > cfg.tile_sample_min_width // s):
            out = self._tiled(latents, encode=False, chunk=chunk, progress=progress)
        else:
            out = np.empty(self.video_shape(latents.shape), np.float32)
            for t0, y in self.iter_decode(latents, chunk=chunk, clamp=False, progress=progress):
                out[:, t0:t0 + y.shape[1]] = y
        if clamp:
            np.clip(out, -1.0, 1.0, out=out)
        return out

    def iter_decode(self, latents, chunk: int | None = 1, clamp: bool = True,
                    progress: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_frame_index, frames [B, n, H, W, 3])`` as decoding proceeds (no spatial tiling)."""
        self._check_latents(latents)
        cfg = self.config.compute_config()
        l = latents.shape[1]
        per_step = max((l - 1) if chunk is None else chunk, 1)
        starts = list(range(1, l, per_step))
        params = self.params
        y, cache = decode_first(params, jnp.asarray(latents[:, :1]), cfg=cfg)
        pending, t0 = y, 0
        bar = None
        if progress and len(starts) > 2:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(starts), desc="VAE decode", unit="chunk", leave=False, dynamic_ncols=True)
        try:
            for s in starts:
                y, cache = decode_step(params, jnp.asarray(latents[:, s:s + per_step]), cache, cfg=cfg)
                frames = np.asarray(pending)  # fetch the previous chunk while this one computes
                if clamp:
                    frames = np.clip(frames, -1.0, 1.0)
                yield t0, frames
                t0 += frames.shape[1]
                pending = y
                if bar is not None:
                    bar.update(1)
            frames = np.asarray(pending)
            if clamp:
                frames = np.clip(frames, -1.0, 1.0)
            yield t0, frames
        finally:
            if bar is not None:
                bar.close()

    # ---- spatial tiling (diffusers' tiled_encode / tiled_decode, same blending)
    def _tiled(self, x, encode: bool, chunk, progress):
        cfg = self.config
        s = cfg.spatial_factor
        if encode:
            # tiles in pixels, blending in latents
            tile_h, tile_w = cfg.tile_sample_min_height, cfg.tile_sample_min_width
            stride_h, stride_w = cfg.tile_sample_stride_height, cfg.tile_sample_stride_width
            blend_h = tile_h // s - stride_h // s
            blend_w = tile_w // s - stride_w // s
            crop_h, crop_w = stride_h // s, stride_w // s
            out_shape = self.latent_shape(x.shape)

            def run(tile):
                return self._encode_tile(tile, chunk, False)
        else:
            tile_h, tile_w = cfg.tile_sample_min_height // s, cfg.tile_sample_min_width // s
            stride_h, stride_w = cfg.tile_sample_stride_height // s, cfg.tile_sample_stride_width // s
            blend_h = cfg.tile_sample_min_height - cfg.tile_sample_stride_height
            blend_w = cfg.tile_sample_min_width - cfg.tile_sample_stride_width
            crop_h, crop_w = cfg.tile_sample_stride_height, cfg.tile_sample_stride_width
            out_shape = self.video_shape(x.shape)

            def run(tile):
                out = np.empty(self.video_shape(tile.shape), np.float32)
                for t0, y in self.iter_decode(tile, chunk=chunk, clamp=False, progress=False):
                    out[:, t0:t0 + y.shape[1]] = y
                return out

        out = np.empty(out_shape, np.float32)
        h, w = x.shape[2], x.shape[3]
        row_starts, col_starts = list(range(0, h, stride_h)), list(range(0, w, stride_w))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(row_starts) * len(col_starts), desc="VAE tiles", unit="tile", leave=False)
        prev_row: list[np.ndarray] | None = None
        for ri, i in enumerate(row_starts):
            row = []
            for ci, j in enumerate(col_starts):
                tile = run(x[:, :, i:i + tile_h, j:j + tile_w])
                # Blend in place with the (already blended) tile above and the one to the left, as diffusers does.
                if prev_row is not None:
                    _blend(prev_row[ci], tile, blend_h, axis=2)
                if ci > 0:
                    _blend(row[ci - 1], tile, blend_w, axis=3)
                row.append(tile)
                piece = tile[:, :, :crop_h, :crop_w]
                y0, x0 = ri * crop_h, ci * crop_w
                ph = min(piece.shape[2], out.shape[2] - y0)
                pw = min(piece.shape[3], out.shape[3] - x0)
                if ph > 0 and pw > 0:
                    out[:, :, y0:y0 + ph, x0:x0 + pw] = piece[:, :, :ph, :pw]
                if bar is not None:
                    bar.update(1)
            prev_row = row
        if bar is not None:
            bar.close()
        return out


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """In place: ``b[:extent] = a[-extent:] * (1 - y/extent) + b[:extent] * (y/extent)`` along ``axis``."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return
    wgt = np.arange(extent, dtype=np.float32) / extent
    shape = [1] * b.ndim
    shape[axis] = extent
    wgt = wgt.reshape(shape)
    a_sl = [slice(None)] * a.ndim
    a_sl[axis] = slice(a.shape[axis] - extent, None)
    b_sl = [slice(None)] * b.ndim
    b_sl[axis] = slice(0, extent)
    b[tuple(b_sl)] = a[tuple(a_sl)] * (1 - wgt) + b[tuple(b_sl)] * wgt
