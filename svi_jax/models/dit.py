"""The Wan2.1 diffusion transformer (T2V and I2V) in Flax, channels-last.

Parameter paths follow the official Wan names with ``/`` for ``.`` (``blocks/self_attn/q/kernel`` is the stack over
layers of ``blocks.{i}.self_attn.q.weight``, transposed), so the official checkpoint and SVI LoRA names map 1:1.

Forward (as the official ``WanModel``): ``x ++ y`` on channels -> 3D patch embedding -> tokens;
``t`` -> sinusoid -> ``time_embedding`` -> ``e``; ``time_projection(silu(e))`` -> 6 per-block modulations;
text context zero-padded to ``text_len`` *before* ``text_embedding`` and attended in full without a mask;
I2V: CLIP tokens -> ``img_emb`` -> prepended to the text context, attended with their own ``k_img``/``v_img``;
blocks (``nn.scan`` + ``nn.remat``); head with its own 2-row modulation; unpatchify.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import einops
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax.linen import meta as nn_meta

from svi_jax.models.audio import audio_branch, audio_input_shapes, audio_tokens
from svi_jax.models.layers import Linear, LayerNorm, RMSNorm, attention, dtype_of, gelu_tanh

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": "nothing_saveable",
    "nothing_saveable": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "everything_saveable": "everything_saveable",
    # attention outputs + the kernels' saved output / log-sum-exp kept, the rest of the block recomputed: the
    # backward does not run the attention forward again (svi_jax.models.remat)
    "save_attention": "save_attention",
    # the same tensors moved to pinned host memory between forward and backward (where the backend has it)
    "offload_attention": "offload_attention",
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    model_type: str = "t2v"          # 't2v' | 'i2v'
    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: int = 1280            # CLIP token width (I2V only)
    # I2V only: Wan2.1's CLIP branch (img_emb, k_img/v_img). False = Wan2.2-A14B I2V: y on the channels, no CLIP
    image_embedding: bool = True
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    # execution
    param_dtype: str = "float32"
    dtype: str = "float32"           # compute dtype
    attention: str = "auto"          # auto | splash | cudnn | flash | per_head | xla | ulysses | ring (layers.py)
    attention_block_q: int = 512     # splash tile sizes (multiples of 128; see models/attention_kernels.py)
    attention_block_kv: int = 512
    remat_policy: str = "none"
    scan_layers: bool = True
    lora_scale: float = 1.0          # s in x W + s (x A) B (alpha / rank while training)
    # extra conditions added to the patch tokens (``extra=`` of ``WanDiT.__call__``)
    pose_embedding: bool = False     # SVI-Dance / UniAnimate dwpose_embedding (svi_jax/models/pose.py)
    # SVI-Talk: MultiTalk audio layers (audio_proj + per-block norm_x / audio_cross_attn), see models/audio.py
    multitalk: bool = False
    audio_in_dim: int = 768          # wav2vec2 hidden width
    audio_layers: int = 12           # wav2vec2 hidden states stacked per audio step
    audio_window: int = 5            # audio steps around each video frame
    audio_vae_scale: int = 4         # video frames per latent frame (after the first)
    audio_hidden: int = 512          # audio_proj intermediate width
    audio_tokens: int = 32           # audio tokens per latent frame
    audio_dim: int = 768             # audio token width (kv_linear input)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    @property
    def uses_clip(self) -> bool:
        """I2V with the CLIP image branch (Wan2.1); Wan2.2-A14B I2V takes y only."""
        return self.is_i2v and self.image_embedding

    # the fields that decide which weights a converted checkpoint holds, and their shapes (pose_embedding is not
    # one: SVI-Dance adds its pose layers to a plain Wan checkpoint, svi_jax/dance_train.py)
    ARCHITECTURE = ("dim", "num_layers", "num_heads", "ffn_dim", "in_dim", "out_dim", "text_dim", "model_type",
                    "image_embedding", "multitalk")

    def architecture_mismatch(self, other: "DiTConfig") -> Optional[tuple]:
        """``(field, mine, other's)`` of the first architecture field where ``other`` differs, else None."""
        for f in self.ARCHITECTURE:
            if getattr(self, f) != getattr(other, f):
                return f, getattr(self, f), getattr(other, f)
        return None

    @classmethod
    def from_dict(cls, d) -> "DiTConfig":
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown DiT config keys {unknown}; known: {sorted(fields)}")
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def validate(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries, got {self.patch_size}")


# ------------------------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(t, dim: int):
    """Wan's timestep embedding: ``[cos(t f), sin(t f)]``, ``f_i = 10000^(-i / (dim/2))``.

    The frequency table is computed in float64 and rounded once; the product and sin/cos are float32.
    """
    half = dim // 2
    freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half).astype(np.float32)
    arg = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Frame/height/width split of the head dimension: ``d - 4(d//6), 2(d//6), 2(d//6)``."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, max_len: int = 1024):
    """cos/sin tables ``[f*h*w, head_dim/2]`` for Wan's 3D RoPE (computed in float64 on the host)."""
    f, h, w = grid
    if max(grid) > max_len:
        raise ValueError(f"latent grid {grid} exceeds rope_max_seq_len {max_len}")
    parts = []
    for n, d in zip((f, h, w), rope_split(head_dim)):
        inv = 1.0 / np.power(theta, np.arange(0, d, 2, dtype=np.float64) / d)   # [d/2]
        parts.append(np.outer(np.arange(n, dtype=np.float64), inv))           # [n, d/2]
    ang = np.concatenate([
        np.broadcast_to(parts[0][:, None, None, :], (f, h, w, parts[0].shape[1])),
        np.broadcast_to(parts[1][None, :, None, :], (f, h, w, parts[1].shape[1])),
        np.broadcast_to(parts[2][None, None, :, :], (f, h, w, parts[2].shape[1])),
    ], axis=-1).reshape(f * h * w, head_dim // 2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotate channel pairs ``(x[2i], x[2i+1])`` (complex multiplication as in Wan). ``x [B, L, H, D]``."""
    dt = x.dtype
    xr = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x1, x2 = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(dt)


# ----------------------------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, cos, sin):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        lin = lambda name, axes=("embed", "heads"): Linear(cfg.dim, axes, dtype=dt, param_dtype=pdt,  # noqa: E731
                                                           lora_scale=cfg.lora_scale, name=name)
        q, k, v = lin("q")(x), lin("k")(x), lin("v")(x)
        if cfg.qk_norm:
            q = RMSNorm(cfg.eps, pdt, "heads", name="norm_q")(q)
            k = RMSNorm(cfg.eps, pdt, "heads", name="norm_k")(k)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads"))
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=cfg.num_heads)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, cfg.attention, block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv)
        o = einops.rearrange(o, "b l h d -> b l (h d)")
        return lin("o", ("heads", "embed"))(o)


class CrossAttention(nn.Module):
    """Text cross-attention; for I2V also image keys/values (``k_img``, ``v_img``) on the first 257 context rows."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, ctx, ctx_img):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        lin = lambda name, axes=("embed", "heads"): Linear(cfg.dim, axes, dtype=dt, param_dtype=pdt,  # noqa: E731
                                                           lora_scale=cfg.lora_scale, name=name)
        norm = lambda name: (RMSNorm(cfg.eps, pdt, "heads", name=name) if cfg.qk_norm else (lambda t: t))  # noqa
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=cfg.num_heads)  # noqa: E731
        q = split(norm("norm_q")(lin("q")(x)))
        k = split(norm("norm_k")(lin("k")(ctx)))
        v = split(lin("v")(ctx))
        o = attention(q, k, v, cfg.attention, block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv)
        if cfg.uses_clip:
            k_img = split(norm("norm_k_img")(lin("k_img")(ctx_img)))
            v_img = split(lin("v_img")(ctx_img))
            o = o + attention(q, k_img, v_img, cfg.attention, block_q=cfg.attention_block_q,
                              block_kv=cfg.attention_block_kv)
        o = einops.rearrange(o, "b l h d -> b l (h d)")
        return lin("o", ("heads", "embed"))(o)


class FFN(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        h = Linear(cfg.ffn_dim, ("embed", "mlp"), dtype=dt, param_dtype=pdt, lora_scale=cfg.lora_scale, name="0")(x)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = gelu_tanh(h)
        return Linear(cfg.dim, ("mlp", "embed"), dtype=dt, param_dtype=pdt, lora_scale=cfg.lora_scale, name="2")(h)


class Block(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, e0, ctx, ctx_img, cos, sin, audio=None):
        cfg = self.cfg
        pdt = dtype_of(cfg.param_dtype)
        mod = self.param("modulation",
                         nn.with_logical_partitioning(nn.initializers.normal(cfg.dim ** -0.5), (None, None, "embed")),
                         (1, 6, cfg.dim), pdt)
        e = mod.astype(jnp.float32) + e0                                   # [B, 6, dim] float32
        shift, scale, gate, c_shift, c_scale, c_gate = [e[:, i][:, None, :] for i in range(6)]
        dt = x.dtype
        h = LayerNorm(cfg.eps, name="norm1")(x).astype(jnp.float32) * (1 + scale) + shift
        y = SelfAttention(cfg, name="self_attn")(h.astype(dtype_of(cfg.dtype)), cos, sin)
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * gate).astype(dt)
        h = LayerNorm(cfg.eps, affine=True, param_dtype=pdt, name="norm3")(x) if cfg.cross_attn_norm else x
        x = x + CrossAttention(cfg, name="cross_attn")(h, ctx, ctx_img).astype(dt)
        if cfg.multitalk and audio is not None:  # SVI-Talk: x += audio_cross_attn(norm_x(x)), no gate
            x = x + audio_branch(cfg, x, audio).astype(dt)
        h = LayerNorm(cfg.eps, name="norm2")(x).astype(jnp.float32) * (1 + c_scale) + c_shift
        y = FFN(cfg, name="ffn")(h.astype(dtype_of(cfg.dtype)))
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * c_gate).astype(dt)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None  # (carry, output): the signature nn.scan expects


class WanDiT(nn.Module):
    """``__call__(x, t, context, clip_fea=None, y=None, extra=None, audio=None)`` -> velocity ``[B, F, H, W, out_dim]``.

    ``extra``: a dict of further condition streams, each read by the module its config field switches on
    (``pose_embedding``: ``extra['pose']``, see :func:`svi_jax.models.pose.pose_tokens`).
    ``audio`` (``multitalk`` only): the windowed features ``(first, later)`` of :func:`svi_jax.talk.audio_windows`."""

    cfg: DiTConfig

    def setup_blocks(self):
        cfg = self.cfg
        policy = REMAT_POLICIES[cfg.remat_policy]
        if policy is not None:
            from svi_jax.models.remat import checkpoint_policy

            policy = checkpoint_policy(policy)
        if cfg.scan_layers:
            blk = Block
            if policy is not None:
                blk = nn.remat(blk, policy=policy, prevent_cse=False)
            return nn.scan(blk, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                           in_axes=(nn.broadcast,) * 6, length=cfg.num_layers,
                           metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="blocks")
        blk = Block
        if policy is not None:
            blk = nn.remat(blk, policy=policy)
        return [blk(cfg, name=f"blocks_{i}") for i in range(cfg.num_layers)]

    @nn.compact
    def __call__(self, x, t, context, clip_fea=None, y=None, extra=None, audio=None):
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        if cfg.is_i2v:
            if y is None or (clip_fea is None and cfg.uses_clip):
                raise ValueError("the I2V model needs both y (conditioning latents) and clip_fea (CLIP tokens)"
                                 if cfg.uses_clip else "the I2V model needs y (conditioning latents)")
            x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
        b, f, h, w, c = x.shape
        if c != cfg.in_dim:
            raise ValueError(f"input has {c} channels (x ++ y), the model expects in_dim={cfg.in_dim}")
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent shape {(f, h, w)} is not divisible by patch {cfg.patch_size}")
        grid = (f // pt, h // ph, w // pw)

        # patch embedding (a Conv3d with kernel = stride = patch)
        tokens = PatchEmbedding(cfg, name="patch_embedding")(x)
        if cfg.pose_embedding:  # SVI-Dance: dwpose_embedding(pose) added to the patch tokens
            from svi_jax.models.pose import pose_tokens

            tokens = tokens + pose_tokens(cfg, extra, grid).astype(tokens.dtype)
        tokens = nn.with_logical_constraint(tokens, ("activation_batch", "activation_length", "activation_embed"))

        # time
        te = TimeEmbedding(cfg, name="time_embedding")(sinusoidal_embedding(t, cfg.freq_dim))   # [B, dim] f32
        e0 = TimeProjection(cfg, name="time_projection")(te).reshape(b, 6, cfg.dim)

        # text (zero-padded to text_len before the embedding, as Wan does) and image context
        L = context.shape[1]
        if L > cfg.text_len:
            raise ValueError(f"text context has {L} tokens, more than text_len={cfg.text_len}")
        if context.shape[-1] != cfg.text_dim:
            raise ValueError(f"text context width {context.shape[-1]} != text_dim {cfg.text_dim}")
        context = jnp.pad(context, ((0, 0), (0, cfg.text_len - L), (0, 0)))
        ctx = TextEmbedding(cfg, name="text_embedding")(context.astype(dt)).astype(dt)
        ctx_img = ImageEmbedding(cfg, name="img_emb")(clip_fea).astype(dt) if cfg.uses_clip else None

        cos, sin = rope_tables(grid, cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)
        audio_tok = audio_tokens(cfg, audio, grid[0])
        xs = tokens
        blocks = self.setup_blocks()
        if cfg.scan_layers:
            xs, _ = blocks(xs, e0, ctx, ctx_img, cos, sin, audio_tok)
        else:
            for blk in blocks:
                xs, _ = blk(xs, e0, ctx, ctx_img, cos, sin, audio_tok)

        out = Head(cfg, name="head")(xs, te)
        out = einops.rearrange(out, "b (f h w) (p q r c) -> b (f p) (h q) (w r) c",
                               f=grid[0], h=grid[1], w=grid[2], p=pt, q=ph, r=pw)
        return out.astype(jnp.float32)


class PatchEmbedding(nn.Module):
    """Wan's Conv3d with kernel = stride = patch, as one contraction over each patch (kernel ``[p, q, r, C, dim]``)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        pt, ph, pw = cfg.patch_size
        init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, None, "conv_in", "embed")),
                            (pt, ph, pw, cfg.in_dim, cfg.dim), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                          (cfg.dim,), pdt)
        patches = einops.rearrange(x.astype(dt), "b (f p) (h q) (w r) c -> b (f h w) p q r c", p=pt, q=ph, r=pw)
        return jnp.einsum("blpqrc,pqrcd->bld", patches, kernel.astype(dt)) + bias.astype(dt)


class TimeEmbedding(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, s):
        cfg = self.cfg
        pdt = dtype_of(cfg.param_dtype)
        init = nn.initializers.normal(0.02)
        h = Linear(cfg.dim, (None, "embed"), dtype=jnp.float32, param_dtype=pdt, kernel_init=init, name="0")(s)
        h = jax.nn.silu(h)
        return Linear(cfg.dim, ("mlp", "embed"), dtype=jnp.float32, param_dtype=pdt, kernel_init=init, name="2")(h)


class TimeProjection(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, e):
        cfg = self.cfg
        return Linear(6 * cfg.dim, ("embed", "mlp"), dtype=jnp.float32, param_dtype=dtype_of(cfg.param_dtype),
                      name="1")(jax.nn.silu(e))


class TextEmbedding(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, c):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        init = nn.initializers.normal(0.02)
        h = Linear(cfg.dim, ("kv", "embed"), dtype=dt, param_dtype=pdt, kernel_init=init, name="0")(c)
        h = jax.nn.gelu(h, approximate=True)
        return Linear(cfg.dim, ("mlp", "embed"), dtype=dt, param_dtype=pdt, kernel_init=init, name="2")(h)


class ImageEmbedding(nn.Module):
    """``img_emb.proj``: LayerNorm -> Linear -> GELU (exact) -> Linear -> LayerNorm (eps 1e-5, affine)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, c):
        return _Proj(self.cfg, name="proj")(c.astype(jnp.float32))


class _Proj(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, c):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        h = LayerNorm(1e-5, affine=True, param_dtype=pdt, name="0")(c)
        h = Linear(cfg.image_dim, ("kv", "mlp"), dtype=dt, param_dtype=pdt, name="1")(h)
        h = jax.nn.gelu(h, approximate=False)
        h = Linear(cfg.dim, ("mlp", "embed"), dtype=dt, param_dtype=pdt, name="3")(h)
        return LayerNorm(1e-5, affine=True, param_dtype=pdt, name="4")(h)


class Head(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, te):
        cfg = self.cfg
        pdt = dtype_of(cfg.param_dtype)
        mod = self.param("modulation",
                         nn.with_logical_partitioning(nn.initializers.normal(cfg.dim ** -0.5), (None, None, "embed")),
                         (1, 2, cfg.dim), pdt)
        e = mod.astype(jnp.float32) + te[:, None, :]
        shift, scale = e[:, 0:1], e[:, 1:2]
        h = LayerNorm(cfg.eps, name="norm")(x).astype(jnp.float32) * (1 + scale) + shift
        out_feats = cfg.out_dim * int(np.prod(cfg.patch_size))
        return Linear(out_feats, ("embed", None), dtype=jnp.float32, param_dtype=pdt, name="head")(h)


# ------------------------------------------------------------------------------------------ the object


def example_inputs(cfg: DiTConfig, batch: int = 1, latent_shape=(1, 2, 2), text_tokens: int | None = None,
                   dtype=jnp.float32):
    """ShapeDtypeStructs of ``(x, t, context, clip_fea, y)`` for a latent grid ``(F, H, W)``."""
    f, h, w = latent_shape
    x = jax.ShapeDtypeStruct((batch, f, h, w, cfg.out_dim), dtype)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((batch, text_tokens or cfg.text_len, cfg.text_dim), dtype)
    clip = y = None
    if cfg.uses_clip:
        clip = jax.ShapeDtypeStruct((batch, 257, cfg.image_dim), dtype)
    if cfg.is_i2v:
        y = jax.ShapeDtypeStruct((batch, f, h, w, cfg.in_dim - cfg.out_dim), dtype)
    return x, t, ctx, clip, y


def init_params(cfg: DiTConfig, key, boxed: bool = False):
    """Random params (plain arrays unless ``boxed``; logical names via :func:`logical_specs`)."""
    module = WanDiT(cfg)
    pt, ph, pw = cfg.patch_size
    x, t, ctx, clip, y = example_inputs(cfg, 1, (2 * pt if cfg.multitalk else pt, ph, pw), text_tokens=1)
    zeros = lambda s: None if s is None else jnp.zeros(s.shape, s.dtype)  # noqa: E731
    extra = None
    if cfg.pose_embedding:
        from svi_jax.models.pose import init_pose

        extra = {"pose": init_pose(cfg.dim)}
    audio = tuple(jnp.zeros(s) for s in audio_input_shapes(cfg, x.shape[1] // pt)) if cfg.multitalk else None
    variables = module.init(key, zeros(x), zeros(t), zeros(ctx), clip_fea=zeros(clip), y=zeros(y), extra=extra,
                            audio=audio)
    params = variables["params"]
    return params if boxed else nn_meta.unbox(params)


def param_shapes(cfg: DiTConfig):
    """ShapeDtypeStructs of the params, without allocating."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def logical_specs(cfg: DiTConfig):
    """The logical axis names of every parameter (a pytree of ``PartitionSpec`` of logical names)."""
    boxed = jax.eval_shape(lambda k: init_params(cfg, k, boxed=True), jax.random.key(0))
    return nn.get_partition_spec(boxed)


class DiT:
    """A loaded Wan DiT: ``.config``, ``.module``, ``.params`` and ``__call__(x, t, context, *, clip_fea, y)``."""

    def __init__(self, config: DiTConfig, params, lora=None):
        self.config = config
        self.module = WanDiT(config)
        self.params = params
        self.lora = lora
        self._fn = jax.jit(self._apply)

    def _apply(self, params, lora, x, t, context, clip_fea, y, extra=None, audio=None):
        variables = {"params": params}
        if lora is not None:
            variables["lora"] = lora
        return self.module.apply(variables, x, t, context, clip_fea=clip_fea, y=y, extra=extra, audio=audio)

    def __call__(self, x, t, context, *, clip_fea=None, y=None, extra=None, audio=None):
        t = jnp.asarray(t, jnp.float32).reshape(-1)
        if t.shape[0] == 1 and x.shape[0] > 1:
            t = jnp.broadcast_to(t, (x.shape[0],))
        return self._fn(self.params, self.lora, x, t, context, clip_fea, y, extra, audio)

    # ---------------------------------------------------------------- io
    @classmethod
    def from_dir(cls, directory: str, lora: Optional[str] = None, lora_scale: float = 1.0, dtype: Optional[str] = None,
                 **overrides):
        """Load a converted DiT; optionally merge an SVI-format LoRA (``W <- W + lora_scale * B @ A``)."""
        from svi_jax.model_dirs import load_params, read_meta

        meta = read_meta(directory)
        if meta["kind"] != "dit":
            raise ValueError(f"{directory} holds a {meta['kind']!r} model, not a DiT")
        cfg_d = dict(meta["config"])
        if dtype is not None:
            cfg_d["dtype"] = dtype
        cfg_d.update(overrides)
        cfg = DiTConfig.from_dict(cfg_d)
        params = load_params(directory, param_shapes(cfg), what=f"DiT checkpoint {directory}")
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype_of(cfg.param_dtype)), params)
        if lora is not None:
            from svi_jax import lora as lora_lib

            params = lora_lib.merge_file(params, lora, scale=lora_scale)
        return cls(cfg, params)

    def save(self, directory: str):
        from svi_jax.model_dirs import save_model

        return save_model(directory, "dit", self.config.to_dict(), self.params)


def flops_per_forward(cfg: DiTConfig, latent_shape, batch: int = 1, text_len: int | None = None,
                      num_img: int = 257) -> float:
    """Analytic matmul FLOPs of one forward (2 * MACs), attention included, elementwise ops excluded."""
    f, h, w = latent_shape
    pt, ph, pw = cfg.patch_size
    n = (f // pt) * (h // ph) * (w // pw)
    d, ff, L = cfg.dim, cfg.ffn_dim, text_len or cfg.text_len
    per_block = (
        4 * n * d * d                 # self q k v o
        + 2 * n * n * d               # scores + weighted sum
        + 2 * n * d * d               # cross q, o
        + 2 * L * d * d               # cross k, v (text)
        + 2 * n * L * d               # cross attention (text)
        + 2 * n * d * ff              # ffn
    )
    if cfg.uses_clip:
        per_block += 2 * num_img * d * d + 2 * n * num_img * d
    total = cfg.num_layers * per_block + n * cfg.in_dim * pt * ph * pw * d + n * d * cfg.out_dim * pt * ph * pw
    total += L * (cfg.text_dim * d + d * d)
    return 2.0 * batch * total
