"""Small shared layers: a LoRA-aware ``Linear``, fp32 norms, attention implementations.

Every parameter carries logical axis names (see ``svi_jax.sharding.LOGICAL_RULES``).

LoRA: a ``Linear`` looks for variables ``a`` ``[in, r]`` and ``b`` ``[r, out]`` in the ``lora`` collection at its own
path; when present it computes ``x W + s (x A) B`` (``s`` = ``lora_scale``) without materialising ``W + s A B``.
The params pytree stays frozen; LoRA weights are a separate pytree (``svi_jax.lora``).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
log = logging.getLogger(__name__)
RESIDUALS = "attention_residuals"  # checkpoint_name of the saved output + log-sum-exp inside the attention VJPs


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
    # Token-contracted weight grads with the small rank-r operand on the left: the big [tokens, in] activation is
    # then a plain [K, N] right operand, and XLA makes no transposed copy of it (it did for tensordot(x, g_xa)).
    lead = tuple(range(x.ndim - 1))
    g_b = jnp.tensordot(xa, gs, axes=(lead, lead))     # [r, out]
    g_a = jnp.tensordot(g_xa, x, axes=(lead, lead)).T  # [in, r]
    g_x = g_xa @ a.T
    g_scale = jnp.sum((xa @ b) * g).astype(scale.dtype)
    return g_x, g_a.astype(a.dtype), g_b.astype(b.dtype), g_scale


_lora_mm.defvjp(_lora_fwd, _lora_bwd)


@jax.custom_jvp
def gelu_tanh(x):
    """``jax.nn.gelu(x, approximate=True)`` (same forward values) whose derivative is one array computed with the
    forward: autodiff of the composite formula keeps four activation-sized residuals per FFN (x, x^3 terms, tanh,
    ...), this keeps one."""
    return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    t = jnp.tanh(c * (x + 0.044715 * (x ** 3)))
    cdf = 0.5 * (1.0 + t)
    slope = cdf + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * (x * x))
    return x * cdf, slope * dx


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
        dt, shape = x.dtype, x.shape
        x = _rows2d(x).astype(jnp.float32)
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
        return y.reshape(shape).astype(dt)


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
        shape = x.shape
        x = _rows2d(x).astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).reshape(shape).astype(dt)


# ----------------------------------------------------------------------------------------------- attention

ATTENTION_IMPLS = ("auto", "splash", "cudnn", "flash", "per_head", "xla", "ulysses", "ring")
XLA_WARN_TOKENS = 8192   # attention='xla' above this many query or key tokens logs the score-matrix size
ATTENTION_OUT = "attention_out"  # checkpoint_name of every attention output (remat policy 'save_attention')


def resolve_attention(impl: str, platform: str | None = None, num_devices: int | None = None) -> str:
    """``auto`` -> the fused kernel of the platform the program is traced for (the mesh in context, else JAX's
    default backend): ``splash`` on TPU, ``cudnn`` on GPU, ``per_head`` on one CPU device (``flash`` on a CPU mesh of
    several devices: ``per_head``'s loop over ``heads x batch`` cannot be split over a batch-sharded mesh, so every
    device would compute every example; ``flash`` on anything else). Never ``xla`` (a dense ``[B, H, Lq, Lk]`` score
    matrix): that stays an explicit choice. ``platform`` / ``num_devices``: of the target (default: traced)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    from svi_jax.models.attention_kernels import platform as traced_platform, traced_num_devices

    plat = platform or traced_platform()
    n = traced_num_devices() if num_devices is None else int(num_devices)
    if plat == "cpu":
        return "per_head" if n <= 1 else "flash"
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(plat, "flash")


def _warn_dense(q, k):
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    if max(lq, lk) > XLA_WARN_TOKENS:
        log.warning("attention='xla' at %d query x %d key tokens materialises a [%d, %d, %d, %d] float32 score "
                    "matrix (%.1f GB per call); attention='auto' picks a fused kernel", lq, lk, b, h, lq, lk,
                    4.0 * b * h * lq * lk / 1e9)


def attention(q, k, v, impl: str = "auto", scale: float | None = None, block_q: int = 512, block_kv: int = 512):
    """Multi-head attention without mask. ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` -> ``[B, Lq, H, D]``.

    * ``auto``: see :func:`resolve_attention`.
    * ``splash`` (Pallas, TPU; interpret mode elsewhere) / ``cudnn`` (cuDNN flash attention, GPU): fused kernels
      (:mod:`svi_jax.models.attention_kernels`), run per device inside ``shard_map`` when a mesh is in context
      (batch over ``data``/``fsdp``, heads over ``tensor``, and Ulysses over ``context``). ``block_q`` /
      ``block_kv``: splash tile sizes.
    * ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, a dense score matrix (warns above
      ``XLA_WARN_TOKENS`` tokens).
    * ``per_head``: one head at a time (``lax.map``) with its own VJP (no stored probabilities); on CPU the fastest
      here (forward+backward 1.29x faster than ``xla``, 1.08x than ``flash`` at 1,950 tokens, see
      ``docs/benchmarks.md``); keeps one ``[Lq, Lk]`` score matrix alive.
    * ``flash``: blockwise pure JAX, ``O(L)`` memory; ``ulysses`` / ``ring``: the sequence sharded over the
      ``context`` mesh axis with ``shard_map`` (see ``svi_jax.models.attention_parallel``), the kernel inside from
      the backend (splash / cudnn / flash).

    The output is tagged ``attention_out`` (``checkpoint_name``) for the remat policies of ``svi_jax.models.dit``.
    """
    impl = resolve_attention(impl)
    d = q.shape[-1]
    scale = (1.0 / np.sqrt(d)) if scale is None else scale
    if impl in ("flash", "ulysses", "ring", "splash", "cudnn"):
        from svi_jax.models import attention_parallel as ap

        if impl == "flash":
            o = ap.flash_attention(q, k, v, scale)
        elif impl in ("splash", "cudnn"):
            o = ap.kernel_attention(q, k, v, impl, scale, block_q, block_kv)
        else:
            o = ap.sequence_parallel_attention(q, k, v, impl, scale, block_q, block_kv)
    elif impl == "xla":
        _warn_dense(q, k)
        o = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    else:
        o = per_head_attention(q, k, v, float(scale))
    return checkpoint_name(o, ATTENTION_OUT)


# Per-head attention with its own VJP. The backward recomputes each head's probabilities from the saved log-sum-exp
# (FlashAttention's recipe) instead of autodiff saving a stacked [layers, heads, B, Lq, Lk] probability tensor; and
# its row term is sum(dO * O) over head_dim, not sum(dP * P) over keys (see docs/benchmarks.md for both effects).


def _rows2d(x):
    """``x`` without its size-1 leading axes (at least 2-D): XLA:CPU's YNNPACK row reductions of a product are
    30-60x slower when the array has a leading axis of size 1 (batch 1), so the norms reduce over this view.
    Dropping unit axes never merges sharded axes."""
    shape = tuple(d for d in x.shape[:-1] if d != 1) or (1,)
    return x.reshape(shape + x.shape[-1:])


def _heads_first(t):
    """``[B, L, H, D]`` -> ``[H * B, L, D]``: one 2-D problem per (head, example)."""
    b, l, h, d = t.shape
    return jnp.moveaxis(t, 2, 0).reshape(h * b, l, d)


def _heads_back(t, like):
    """``[H * B, L, D]`` -> ``[B, L, H, D]`` in ``like``'s dtype."""
    b, _, h, _ = like.shape
    return jnp.moveaxis(t.reshape((h, b) + t.shape[1:]), 0, 2).astype(like.dtype)


def _head_scores(qh, kh, scale):
    return jnp.einsum("qd,kd->qk", qh, kh, preferred_element_type=jnp.float32) * scale


def _per_head_fwd_impl(q, k, v, scale):
    def one_head(qkv):
        qh, kh, vh = qkv                                   # [L, D]
        s = _head_scores(qh, kh, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        den = jnp.sum(e, axis=-1, keepdims=True)
        o = (e / den).astype(vh.dtype) @ vh
        return o, m + jnp.log(den)                         # lse [Lq, 1] float32

    o, lse = jax.lax.map(one_head, (_heads_first(q), _heads_first(k), _heads_first(v)))
    return _heads_back(o, q), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def per_head_attention(q, k, v, scale: float):
    """Softmax attention one head at a time (``lax.map``); ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]``."""
    return _per_head_fwd_impl(q, k, v, scale)[0]


def _per_head_fwd(q, k, v, scale):
    o, lse = _per_head_fwd_impl(q, k, v, scale)
    o, lse = checkpoint_name(o, RESIDUALS), checkpoint_name(lse, RESIDUALS)
    return o, (q, k, v, o, lse)


def _per_head_bwd(scale, res, do):
    q, k, v, o, lse = res

    def one_head(args):
        qh, kh, vh, oh, doh, lseh = args                                       # [L, D], [Lq, 1]
        dh = jnp.sum(doh.astype(jnp.float32) * oh.astype(jnp.float32), axis=-1, keepdims=True)  # 2-D, _rows2d
        p = jnp.exp(_head_scores(qh, kh, scale) - lseh)                       # [Lq, Lk] float32
        dv = p.astype(doh.dtype).T @ doh
        dp = jnp.einsum("qd,kd->qk", doh, vh, preferred_element_type=jnp.float32)
        ds = (p * (dp - dh) * scale).astype(qh.dtype)
        return ds @ kh, ds.T @ qh, dv

    dq, dk, dv = jax.lax.map(one_head, tuple(_heads_first(t) for t in (q, k, v, o, do)) + (lse,))
    return _heads_back(dq, q), _heads_back(dk, k), _heads_back(dv, v)


per_head_attention.defvjp(_per_head_fwd, _per_head_bwd)
