"""The Wan2.1 causal 3D VAE's Flax modules (``WanVAE`` and its blocks); the API is :mod:`svi_jax.models.vae`."""
from __future__ import annotations

import math
from typing import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.models.layers import Linear, attention, dtype_of
from svi_jax.models.vae_config import VIDEO_AXES, Dtype, VAEConfig


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


