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
from typing import Any, Callable, Iterator

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.models.vae_config import (ENCODE_FRAMES_PER_CHUNK, VIDEO_AXES, WAN21_LATENTS_MEAN,  # noqa: F401
                                      WAN21_LATENTS_STD, VAEConfig, wan21_config)
from svi_jax.models.vae_layers import WanVAE


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
        from svi_jax.model_dirs import CheckpointError, load_params, read_meta

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
        from svi_jax.model_dirs import save_model

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
