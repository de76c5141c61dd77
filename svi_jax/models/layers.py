"""Small shared layers: a LoRA-aware ``Linear``, fp32 norms, attention implementations.

Every parameter carries logical axis names (see ``svi_jax.sharding.LOGICAL_RULES``).

LoRA: a ``Linear`` looks for variables ``a`` ``[in, r]`` and ``b`` ``[r, out]`` in the ``lora`` collection at its own
path; when present it computes ``x W + s (x A) B`` (``s`` = ``lora_scale``) without materialising ``W + s A B``.
The params pytree stays frozen; LoRA weights are a separate pytree (``svi_jax.lora``).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

Dtype = Any


def dtype_of(name) -> jnp.dtype:
    if name is None:
        return jnp.float32
    if isinstance(name, str):
        return {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                "float16": jnp.float16, "fp16": jnp.float16}[name]
    return jnp.dtype(name)


def lora_matmul(x, a, b, scale):
    """``s (x A) B`` with a custom VJP.

    XLA's default backward for the LoRA branch materialises transposed copies of the big activation gradient; here
    the cotangents are written as plain contractions over the token axes (see ``docs/benchmarks.md``).
    """
    return _lora_mm(x, a, b, jnp.asarray(scale, x.dtype))


@jax.custom_vjp
def _lora_mm(x, a, b, scale):
    return (x @ a) @ b * scale


def _lora_fwd(x, a, b, scale):
    xa = x @ a
    return (xa @ b) * scale, (x, a, b, xa, scale)


def _lora_bwd(res, g):
    x, a, b, xa, scale = res
    gs = g * scale
    g_xa = gs @ b.T                                   # [..., r]
    lead = tuple(range(x.ndim - 1))
    g_b = jnp.tensordot(xa, gs, axes=(lead, lead))   # [r, out]
    g_a = jnp.tensordot(x, g_xa, axes=(lead, lead))  # [in, r]
    g_x = g_xa @ a.T
    g_scale = jnp.sum((xa @ b) * g).astype(scale.dtype)
    return g_x, g_a.astype(a.dtype), g_b.astype(b.dtype), g_scale


_lora_mm.defvjp(_lora_fwd, _lora_bwd)


class Linear(nn.Module):
    """Dense layer ``[in, out]`` kernel with logical axes, optional LoRA branch, configurable dtypes."""

    features: int
    axes: Sequence[str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
                            (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[-1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable("lora", "a"):
            a = self.get_variable("lora", "a").astype(self.dtype)
            b = self.get_variable("lora", "b").astype(self.dtype)
            y = y + lora_matmul(x, a, b, self.lora_scale)
        return y


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (Wan's FP32LayerNorm), optional affine."""

    eps: float = 1e-6
    affine: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dt = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            d = x.shape[-1]
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                               (d,), self.param_dtype)
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                              (d,), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(dt)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis in float32 with a learned scale (Wan's qk-norm across heads, T5's layer norm)."""

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = "norm"

    @nn.compact
    def __call__(self, x):
        dt = x.dtype
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(dt)


# ----------------------------------------------------------------------------------------------- attention

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "per_head")


def resolve_attention(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    return "per_head" if backend == "cpu" else "xla"


def attention(q, k, v, impl: str = "auto", scale: float | None = None):
    """Multi-head attention without mask. ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` -> ``[B, Lq, H, D]``.

    * ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention`` with that implementation.
    * ``per_head``: one head at a time (``lax.map``); on CPU this is ~2.4x faster than the fused XLA version
      (see ``../shared/reference/perf_notes.md``) and keeps one ``[Lq, Lk]`` score matrix alive.
    """
    impl = resolve_attention(impl)
    d = q.shape[-1]
    scale = (1.0 / np.sqrt(d)) if scale is None else scale
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)

    def one_head(qkv):
        qh, kh, vh = qkv                                   # [B, L, D]
        s = jnp.einsum("bqd,bkd->bqk", qh, kh, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(s, axis=-1).astype(vh.dtype)
        return jnp.einsum("bqk,bkd->bqd", p, vh)

    qs, ks, vs = (jnp.moveaxis(t, 2, 0) for t in (q, k, v))  # [H, B, L, D]
    out = jax.lax.map(one_head, (qs, ks, vs))
    return jnp.moveaxis(out, 0, 2)
