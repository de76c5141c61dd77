"""UMT5 text encoder (Wan's ``umt5-xxl`` encoder) in Flax, with Wan's text convention.

Architecture (``wan/modules/t5.py`` / transformers ``UMT5EncoderModel``): token embedding, ``num_layers``
pre-norm blocks (RMS norm, self-attention with *no* 1/sqrt(d) scaling plus a relative-position bias that every
layer owns, gated-GELU(tanh) FFN, no biases), final RMS norm. Padded keys are masked in attention.

Wan's convention: prompts are tokenized to ``text_len`` (512) tokens and the encoder output at padded positions
is zeroed (Wan cuts each output to its prompt length and zero-pads it back to 512 before the DiT).

Parameters (names follow the official checkpoint, blocks stacked on a leading 'layers' axis by ``nn.scan``)::

    token_embedding                [vocab, dim]          ('vocab', 'embed')
    blocks/norm1/scale             [L, dim]              ('layers', 'norm')
    blocks/attn/{q,k,v}/kernel     [L, dim, dim_attn]    ('layers', 'embed', 'heads')
    blocks/attn/o/kernel           [L, dim_attn, dim]    ('layers', 'heads', 'embed')
    blocks/pos_embedding           [L, buckets, heads]   ('layers', None, None)
    blocks/norm2/scale             [L, dim]
    blocks/ffn/{gate,fc1}/kernel   [L, dim, dim_ffn]     ('layers', 'embed', 'mlp')
    blocks/ffn/fc2/kernel          [L, dim_ffn, dim]     ('layers', 'mlp', 'embed')
    norm/scale                     [dim]
"""
from __future__ import annotations

import dataclasses
import math
import os
from functools import partial
from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from svi_jax.models.layers import Linear, RMSNorm, dtype_of

KIND = "t5"


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # storage dtype of the params

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def relative_position_buckets(lq: int, lk: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 relative-position buckets ``[lq, lk]`` (int32), computed in float32 as transformers does."""
    rel = np.arange(lk, dtype=np.int64)[None, :] - np.arange(lq, dtype=np.int64)[:, None]
    nb = num_buckets // 2
    out = (rel > 0).astype(np.int64) * nb
    rel = np.abs(rel)
    max_exact = nb // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(rel.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
        ratio = ratio * np.float32(nb - max_exact)
        large = max_exact + np.where(np.isfinite(ratio), ratio, 0).astype(np.int64)
    large = np.minimum(large, nb - 1)
    out = out + np.where(rel < max_exact, rel, large)
    return out.astype(np.int32)


class _Attention(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, x, bias, mask):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        lin = partial(Linear, use_bias=False, dtype=dt, param_dtype=pdt)
        q, k, v = (rearrange(lin(c.dim_attn, ("embed", "heads"), name=n)(x), "b l (h d) -> b l h d", h=c.num_heads)
                   for n in ("q", "k", "v"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # T5: no 1/sqrt(d)
        s = s + bias[None]
        s = jnp.where(mask[:, None, None, :] > 0, s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(dt)
        o = rearrange(jnp.einsum("bhqk,bkhd->bqhd", p, v), "b l h d -> b l (h d)")
        return lin(c.dim, ("heads", "embed"), name="o")(o)


class _FeedForward(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        lin = partial(Linear, use_bias=False, dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        h = lin(c.dim_ffn, ("embed", "mlp"), name="fc1")(x) * jax.nn.gelu(
            lin(c.dim_ffn, ("embed", "mlp"), name="gate")(x), approximate=True)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return lin(c.dim, ("mlp", "embed"), name="fc2")(h)


class T5Block(nn.Module):
    """One UMT5 encoder layer (its own relative-position bias table); scan-compatible ``(x, ...) -> (x, None)``."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x, buckets, mask):
        c = self.cfg
        pdt = dtype_of(c.param_dtype)
        table = self.param("pos_embedding", nn.with_logical_partitioning(
            nn.initializers.normal((2 * c.num_buckets * c.num_heads) ** -0.5), (None, None)),
            (c.num_buckets, c.num_heads), pdt)
        bias = rearrange(jnp.take(table.astype(jnp.float32), buckets, axis=0), "q k h -> h q k")
        x = x + _Attention(c, name="attn")(RMSNorm(c.eps, pdt, name="norm1")(x), bias, mask)
        x = x + _FeedForward(c, name="ffn")(RMSNorm(c.eps, pdt, name="norm2")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, None


class UMT5(nn.Module):
    """``(ids [B, L] int, mask [B, L]) -> [B, L, dim]`` with padded rows zeroed."""

    cfg: T5Config

    @nn.compact
    def __call__(self, ids, mask):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        emb = self.param("token_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                         ("vocab", "embed")),
                         (c.vocab_size, c.dim), pdt)
        x = jnp.take(emb, ids, axis=0).astype(dt)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        length = ids.shape[1]
        buckets = jnp.asarray(relative_position_buckets(length, length, c.num_buckets, c.max_distance))
        blocks = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(c, name="blocks")(x, buckets, mask)
        x = RMSNorm(c.eps, pdt, name="norm")(x)
        return x * (mask[..., None] > 0).astype(x.dtype)


def param_shapes(cfg: T5Config):
    """Tree of ``jax.ShapeDtypeStruct`` for the (unboxed) params of ``cfg``."""
    ids = jnp.zeros((1, 2), jnp.int32)
    tree = jax.eval_shape(lambda: UMT5(cfg).init(jax.random.PRNGKey(0), ids, ids))["params"]
    return nn.meta.unbox(tree)


def logical_axes(cfg: T5Config):
    """Tree of ``PartitionSpec`` of logical axis names, same structure as the params."""
    ids = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: UMT5(cfg).init(jax.random.PRNGKey(0), ids, ids))["params"]
    return nn.get_partition_spec(boxed)


class T5Encoder:
    """A loaded UMT5 encoder: ``encode(texts)`` / ``encode_ids(ids, mask)`` -> ``(emb [B, L, dim], mask [B, L])``."""

    def __init__(self, config: T5Config | dict, params, tokenizer=None):
        self.config = config if isinstance(config, T5Config) else T5Config.from_dict(config)
        self.params = params
        self.module = UMT5(self.config)
        self._tokenizer = tokenizer
        self._tokenizer_dir = getattr(tokenizer, "directory", None)
        self._tokenizer_backend = "auto"
        self._fn = jax.jit(lambda p, ids, mask: self.module.apply({"params": p}, ids, mask))

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, config: T5Config | dict, seed: int = 0, tokenizer=None) -> "T5Encoder":
        """Randomly initialised encoder (tests, smoke runs)."""
        cfg = config if isinstance(config, T5Config) else T5Config.from_dict(config)
        ids = jnp.zeros((1, 2), jnp.int32)
        params = nn.meta.unbox(UMT5(cfg).init(jax.random.PRNGKey(seed), ids, ids)["params"])
        return cls(cfg, params, tokenizer)

    @classmethod
    def from_dir(cls, directory: str, dtype=None, param_dtype=None, tokenizer_dir: str | None = None,
                 text_len: int | None = None, tokenizer_backend: str = "auto") -> "T5Encoder":
        """Load a directory written by ``convert/from_torch.py t5`` or :meth:`save`.

        ``dtype``: compute dtype (default: the config's); ``param_dtype``: cast the params (default: as stored).
        The tokenizer is ``tokenizer_dir`` or ``DIR/tokenizer``; it is only needed by :meth:`encode`.
        """
        from svi_jax.model_dirs import CheckpointError, load_model_dir

        cfg, params = load_model_dir(directory, KIND, T5Config, param_shapes, "UMT5", dtype, param_dtype,
                                     text_len=None if text_len is None else int(text_len))
        obj = cls(cfg, params)
        tok_dir = tokenizer_dir or os.path.join(directory, "tokenizer")
        if os.path.isdir(tok_dir):
            obj._tokenizer_dir = tok_dir
            obj._tokenizer_backend = tokenizer_backend
        elif tokenizer_dir is not None:
            raise CheckpointError(f"tokenizer directory {tokenizer_dir} does not exist")
        return obj

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._tokenizer_dir is None:
                raise RuntimeError("this T5Encoder has no tokenizer: convert with `--tokenizer DIR`, pass "
                                   "`tokenizer_dir=` to load(), or call encode_ids() with pre-tokenized ids")
            from svi_jax.models.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self._tokenizer_dir, self.config.text_len, backend=self._tokenizer_backend)
        return self._tokenizer

    def save(self, directory: str, tokenizer_dir: str | None = None) -> str:
        """Write ``config.json`` + params (+ ``tokenizer/`` from ``tokenizer_dir`` or the loaded tokenizer)."""
        from svi_jax.model_dirs import save_model
        from svi_jax.models.tokenizer import copy_tokenizer

        out = save_model(directory, KIND, self.config.to_dict(), jax.device_get(self.params))
        tok = tokenizer_dir or self._tokenizer_dir
        if tok is not None:
            copy_tokenizer(tok, os.path.join(out, "tokenizer"))
        return out

    # ------------------------------------------------------------------ inference
    @property
    def logical_axes(self):
        return logical_axes(self.config)

    def encode_ids(self, ids, mask):
        """``ids, mask [B, L]`` -> ``(emb [B, L, dim], mask)``; emb is zero wherever ``mask`` is 0."""
        ids = jnp.asarray(ids, jnp.int32)
        mask = jnp.asarray(mask, jnp.int32)
        chex.assert_rank([ids, mask], 2)
        chex.assert_equal_shape([ids, mask])
        return self._fn(self.params, ids, mask), mask

    def encode(self, texts: str | Sequence[str]):
        """Tokenize (clean, truncate/pad to ``text_len``) and encode -> ``(emb [B, text_len, dim], mask)``."""
        ids, mask = self.tokenizer(texts)
        return self.encode_ids(ids, mask)

    def __call__(self, texts):
        return self.encode(texts)
