"""The UniAnimate / SVI-Dance pose embedding (``dwpose_embedding``), channels-last.

Official (``diffsynth/pipelines/svi_video_dance.py`` L253-279, ``train_svi_dance.py`` L666-680): an
``nn.Sequential`` of 7 Conv3d with SiLU after every one but the last::

    0: 3 -> 16, k3 s1 p1   2: 16 -> 16, k3 s1 p1   4: 16 -> 16, k3 s1 p1   6: 16 -> 16, k3 s(1,2,2) p1
    8: 16 -> 16, k3 s2 p1  10: 16 -> 16, k3 s2 p1  12: 16 -> dim, k = s = (1,2,2), p0

applied to ``cat([pose[:, :, :1] x 3, pose]) / 255`` (81 -> 84 frames), giving ``[dim, 21, H/16, W/16]``, which is
flattened ``(f h w)`` and **added to the patch-embedded tokens** (before RoPE and block 0). Parameter names follow
the Sequential indices (``dwpose_embedding/0/kernel`` <- ``dwpose_embedding.0.weight``).

Here: pose frames ``[B, T, H, W, 3]`` (0..255, ``T = 1 + 4k``) -> tokens ``[B, (1 + k) (H/16) (W/16), dim]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from svi_jax.models.layers import dtype_of

POSE_CHANNELS = 16
# (Sequential index, out channels or None = model dim, kernel, stride, padding)
LAYERS = (
    (0, POSE_CHANNELS, (3, 3, 3), (1, 1, 1), 1),
    (2, POSE_CHANNELS, (3, 3, 3), (1, 1, 1), 1),
    (4, POSE_CHANNELS, (3, 3, 3), (1, 1, 1), 1),
    (6, POSE_CHANNELS, (3, 3, 3), (1, 2, 2), 1),
    (8, POSE_CHANNELS, (3, 3, 3), (2, 2, 2), 1),
    (10, POSE_CHANNELS, (3, 3, 3), (2, 2, 2), 1),
    (12, None, (1, 2, 2), (1, 2, 2), 0),
)
FIRST_FRAME_REPEATS = 3


def pose_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid of the pose embedding for ``T`` pose frames of ``H x W`` pixels (conv arithmetic, as torch)."""
    f, h, w = num_frames + FIRST_FRAME_REPEATS, height, width
    for _, _, k, s, p in LAYERS:
        f, h, w = [(n + 2 * p - kk) // ss + 1 for n, kk, ss in zip((f, h, w), k, s)]
    return f, h, w


class Conv3d(nn.Module):
    """A channels-last Conv3d (kernel ``[kt, kh, kw, in, out]``) with logical axis names."""

    features: int
    kernel: tuple
    stride: tuple
    padding: int
    out_axis: str = "conv_out"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dt, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
        cin = x.shape[-1]
        init = nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, None, "conv_in", self.out_axis)),
                            tuple(self.kernel) + (cin, self.features), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.out_axis,)),
                          (self.features,), pdt)
        y = jax.lax.conv_general_dilated(x.astype(dt), kernel.astype(dt), window_strides=self.stride,
                                         padding=[(self.padding, self.padding)] * 3,
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + bias.astype(dt)


class PoseEmbedding(nn.Module):
    """``dwpose_embedding``: pose frames ``[B, T, H, W, 3]`` in 0..255 -> tokens ``[B, L, dim]``."""

    dim: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, pose):
        if pose.ndim != 5 or pose.shape[-1] != 3:
            raise ValueError(f"pose frames must be [B, T, H, W, 3], got shape {tuple(pose.shape)}")
        x = pose.astype(jnp.float32)
        x = jnp.concatenate([jnp.repeat(x[:, :1], FIRST_FRAME_REPEATS, axis=1), x], axis=1) / 255.0
        x = x.astype(dtype_of(self.dtype))
        for idx, cout, k, s, p in LAYERS:
            last = cout is None
            x = Conv3d(self.dim if last else cout, k, s, p, out_axis="embed" if last else "conv_out", dtype=self.dtype,
                       param_dtype=self.param_dtype, name=str(idx))(x)
            if not last:
                x = jax.nn.silu(x)
        b, f, h, w, c = x.shape
        return x.reshape(b, f * h * w, c)


def check_pose_grid(pose_shape, grid) -> None:
    """A clear error when the pose frames do not give the latent token grid ``(f, h, w)``."""
    got = pose_grid(*pose_shape[1:4])
    if tuple(got) != tuple(grid):
        raise ValueError(f"pose frames {tuple(pose_shape[1:4])} (T, H, W) give a {got} token grid, the latents a "
                         f"{tuple(grid)} one: the pose video must have the clip's frame count and pixel size")


def pose_tokens(cfg, extra, grid):
    """The pose tokens a DiT with ``cfg.pose_embedding`` adds to its patch tokens, from ``extra``:

    * ``extra['pose']``: pose frames ``[B, T, H, W, 3]`` (0..255) -> the ``dwpose_embedding`` module (a child of the
      calling DiT, so call this from its compact ``__call__``);
    * or ``extra['pose_tokens']``: already embedded tokens ``[B, L, dim]`` (the sampler embeds once per clip);
    * ``extra['pose_keep']`` (optional, ``[B]``): multiplies the tokens (0 = the official training-time zeroing of
      the pose condition, applied to the embedding's output as ``train_svi_dance.py`` L1055-1060 does).
    """
    extra = extra or {}
    if "pose_tokens" in extra:
        tok = extra["pose_tokens"]
        if tok.shape[1] != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{tok.shape[1]} pose tokens for a {tuple(grid)} token grid")
    elif "pose" in extra:
        check_pose_grid(extra["pose"].shape, grid)
        tok = PoseEmbedding(cfg.dim, cfg.dtype, cfg.param_dtype, name="dwpose_embedding")(extra["pose"])
    else:
        raise ValueError("this DiT has a pose embedding (config pose_embedding=True): pass extra={'pose': "
                         "frames [B, T, H, W, 3]} (or 'pose_tokens')")
    if "pose_keep" in extra:
        tok = tok * extra["pose_keep"].astype(tok.dtype)[:, None, None]
    return tok


def init_pose(dim: int):
    """Zero pose frames for initialising a DiT with a pose embedding (one latent token: T=1, 16x16 pixels)."""
    return jnp.zeros((1, 1, 16, 16, 3), jnp.float32)


def embed_once(cfg, params, extra):
    """``extra`` with its pose frames replaced by their tokens (``'pose'`` -> ``'pose_tokens'``), so a sampler
    embeds the pose once per clip rather than at every step. Other entries pass through."""
    if not extra or "pose" not in extra or not getattr(cfg, "pose_embedding", False):
        return extra
    out = {k: v for k, v in extra.items() if k != "pose"}
    emb = PoseEmbedding(cfg.dim, cfg.dtype, cfg.param_dtype)
    out["pose_tokens"] = emb.apply({"params": params["dwpose_embedding"]}, extra["pose"])
    return out
