"""Memory-efficient and sequence-parallel attention.

* :func:`flash_attention`: blockwise attention with an online softmax and a custom VJP (the backward recomputes
  the scores block by block from the saved log-sum-exp), pure JAX, any backend. Memory is ``O(L)`` instead of
  ``O(L^2)``: for a 32,760-token clip one ``[L, L]`` fp32 score matrix per head is 4.3 GB; here one
  ``[block_q, block_k]`` tile per head is alive at a time. Padding of ragged lengths is masked.
* :func:`sequence_parallel_attention`: attention over a sequence sharded along the ``context`` mesh axis, with
  ``jax.shard_map`` over the mesh in the current context (``jax.set_mesh``):

  - ``ulysses``: an all-to-all swaps the sequence shards for head shards (``[b, L/c, h, D] -> [b, L, h/c, D]``),
    local flash attention over the whole sequence, and an all-to-all back. Needs the local head count (heads /
    tensor) divisible by the context size. Communication: 4 all-to-alls of the activations per call.
  - ``ring``: each device keeps its query shard and passes key/value shards around the ring (``ppermute``),
    merging partial results by log-sum-exp; the backward runs the ring again and sends the key/value gradients
    home. No head-count constraint; ``c - 1`` hops of K/V per call.

  Cross-attention (keys and values from the short text/image context) is recognised by ``Lk != Lq``: the context
  stays replicated over the ``context`` axis and only the queries are sharded, with no communication.
  Batch is split over the ``data``/``fsdp`` axes and heads over ``tensor`` where the sizes divide.
  Without a mesh (or with a ``context`` axis of size 1) both fall back to the local kernel.
  The per-device kernel (``kernel=``) is the platform's by default: splash on TPU, cuDNN on GPU, :func:`flash_attention`
  elsewhere (``svi_jax.models.attention_kernels``); ring hops always use the blockwise kernel here.
* :func:`kernel_attention`: a fused kernel (``splash`` / ``cudnn``) run per device inside ``shard_map`` over the
  batch and head axes of the mesh in context (Ulysses when ``context`` > 1).

Layout everywhere: ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` -> ``[B, Lq, H, D]`` in the dtype of ``q``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from svi_jax.models.attention_kernels import RESIDUAL_NAME as RESIDUALS, backend_kernel, cudnn_attention, splash_attention

NEG = -1e30  # masked score (finite, so exp() underflows to 0 without inf - inf = nan)
BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"
HEAD_AXIS = "tensor"
SEQUENCE_PARALLEL_IMPLS = ("ulysses", "ring")


# ------------------------------------------------------------------------------------------------ blocks


def _block_size(n: int, target: int) -> int:
    """A block size for length ``n``: ``n`` itself if small, else a divisor of ``n`` in [target/2, target] or
    ``target`` (then the tail is padded and masked)."""
    if n <= target:
        return n
    for b in range(target, target // 2 - 1, -1):
        if n % b == 0:
            return b
    return target


def _blocks(x, b):
    """``[B, H, L, D] -> [n, B, H, b, D]`` (zero-padded to a multiple of ``b``)."""
    L = x.shape[2]
    n = -(-L // b)
    if n * b != L:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, n * b - L), (0, 0)))
    return jnp.moveaxis(x.reshape(x.shape[:2] + (n, b) + x.shape[3:]), 2, 0)


def _unblocks(x, L):
    """``[n, B, H, b, ...] -> [B, H, L, ...]``."""
    x = jnp.moveaxis(x, 0, 2)
    x = x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])
    return x[:, :, :L]


def _key_mask(Lk, nk, bk):
    return (jnp.arange(nk * bk) < Lk).reshape(nk, bk)


def _fwd(q, k, v, scale, bq, bk, kv_len=None):
    """``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]`` -> ``(o [B, H, Lq, D] float32, lse [B, H, Lq] float32)``.

    Only the first ``kv_len`` keys (default all; may be traced) take part."""
    Lq, Lk = q.shape[2], k.shape[2]
    qb, kb, vb = _blocks(q, bq), _blocks(k, bk), _blocks(v, bk)
    mask = _key_mask(Lk if kv_len is None else kv_len, kb.shape[0], bk)

    def per_q(qi):
        def body(carry, xs):
            o, m, l = carry
            kj, vj, mj = xs
            s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mj, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            o = o * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(vj.dtype), vj,
                                                 preferred_element_type=jnp.float32)
            return (o, m_new, l), None

        shape = qi.shape[:-1]
        init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32))
        (o, m, l), _ = lax.scan(body, init, (kb, vb, mask))
        return o / l[..., None], m + jnp.log(l)

    o, lse = lax.map(per_q, qb)
    return _unblocks(o, Lq), _unblocks(lse, Lq)


def _bwd(q, k, v, lse, delta, do, scale, bq, bk, kv_len=None):
    """Gradients of blockwise attention given the *final* ``lse`` and ``delta = sum(do * o, -1)`` of each query
    row (so the same function serves one device and one ring hop). Returns float32 ``dq, dk, dv``."""
    Lq, Lk = q.shape[2], k.shape[2]
    qb, dob = _blocks(q, bq), _blocks(do, bq)
    lseb = _blocks(lse[..., None], bq)[..., 0]
    deltab = _blocks(delta[..., None], bq)[..., 0]
    kb, vb = _blocks(k, bk), _blocks(v, bk)
    mask = _key_mask(Lk if kv_len is None else kv_len, kb.shape[0], bk)

    def per_k(dq, xs):
        kj, vj, mj = xs

        def per_q(carry, ys):
            dkj, dvj = carry
            qi, doi, lsei, deltai = ys
            s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
            p = jnp.where(mj, jnp.exp(s - lsei[..., None]), 0.0)
            dvj = dvj + jnp.einsum("bhqk,bhqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - deltai[..., None])
            dqi = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
            dkj = dkj + jnp.einsum("bhqk,bhqd->bhkd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
            return (dkj, dvj), dqi * scale

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dkj, dvj), dqs = lax.scan(per_q, (zeros, zeros), (qb, dob, lseb, deltab))
        return dq + dqs, (dkj * scale, dvj)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(per_k, dq0, (kb, vb, mask))
    return _unblocks(dq, Lq), _unblocks(dk, Lk), _unblocks(dv, Lk)


def _to_bhld(x):
    return jnp.swapaxes(x, 1, 2)


# ------------------------------------------------------------------------------------------------ flash


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, scale, bq, bk, kv_len):
    o, _ = _fwd(q, k, v, scale, bq, bk, kv_len)
    return o.astype(q.dtype)


def _flash_fwd(q, k, v, scale, bq, bk, kv_len):
    o, lse = _fwd(q, k, v, scale, bq, bk, kv_len)
    o = checkpoint_name(o.astype(q.dtype), RESIDUALS)
    return o, (q, k, v, o, checkpoint_name(lse, RESIDUALS))


def _flash_bwd(scale, bq, bk, kv_len, res, do):
    q, k, v, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    dq, dk, dv = _bwd(q, k, v, lse, delta, do, scale, bq, bk, kv_len)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, scale: float | None = None, block_q: int = 512, block_k: int = 512,
                    kv_len: int | None = None):
    """Exact attention without materialising ``[Lq, Lk]``; ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]``; only the
    first ``kv_len`` (static) keys take part when given."""
    scale = float(1.0 / np.sqrt(q.shape[-1])) if scale is None else float(scale)
    bq, bk = _block_size(q.shape[1], block_q), _block_size(k.shape[1], block_k)
    o = _flash(_to_bhld(q), _to_bhld(k), _to_bhld(v), scale, bq, bk, None if kv_len is None else int(kv_len))
    return _to_bhld(o)


# ------------------------------------------------------------------------------------------------ ring


def flash_kernel(q, k, v, scale=None, block_q: int = 512, block_kv: int = 512, kv_len=None):
    return flash_attention(q, k, v, scale, block_q, block_kv, kv_len=kv_len)


LOCAL_KERNELS = {"splash": splash_attention, "cudnn": cudnn_attention, "flash": flash_kernel}


def local_kernel(name: str):
    """The per-device kernel ``(q, k, v, scale, block_q, block_kv, kv_len) -> o`` run inside the shard_map."""
    if name not in LOCAL_KERNELS:
        raise ValueError(f"no local attention kernel {name!r}; one of {sorted(LOCAL_KERNELS)}")
    return LOCAL_KERNELS[name]


def _ring_perm(c):
    return [(j, (j + 1) % c) for j in range(c)]


def _valid(axis, c, hop, block, total):
    """Valid keys of the block this device holds after ``hop`` ring steps (the sequence may be padded)."""
    src = (lax.axis_index(axis) - hop) % c
    return jnp.clip(total - src * block, 0, block)


def _ring_fwd_loop(q, k, v, scale, bq, bk, axis, c, total):
    Lc = k.shape[2]
    o, lse = _fwd(q, k, v, scale, bq, bk, _valid(axis, c, 0, Lc, total))

    def hop(i, carry):
        o, lse, k, v = carry
        k, v = lax.ppermute((k, v), axis, _ring_perm(c))
        oi, lsei = _fwd(q, k, v, scale, bq, bk, _valid(axis, c, i, Lc, total))
        new = jnp.logaddexp(lse, lsei)
        o = o * jnp.exp(lse - new)[..., None] + oi * jnp.exp(lsei - new)[..., None]
        return o, new, k, v

    o, lse, _, _ = lax.fori_loop(1, c, hop, (o, lse, k, v))
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _ring(q, k, v, scale, bq, bk, axis, c, total):
    o, _ = _ring_fwd_loop(q, k, v, scale, bq, bk, axis, c, total)
    return o.astype(q.dtype)


def _ring_vjp_fwd(q, k, v, scale, bq, bk, axis, c, total):
    o, lse = _ring_fwd_loop(q, k, v, scale, bq, bk, axis, c, total)
    o = o.astype(q.dtype)
    return o, (q, k, v, o, lse)


def _ring_vjp_bwd(scale, bq, bk, axis, c, total, res, do):
    q, k, v, o, lse = res
    Lc = k.shape[2]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    dq, dk, dv = _bwd(q, k, v, lse, delta, do, scale, bq, bk, _valid(axis, c, 0, Lc, total))

    def hop(i, carry):
        dq, k, v, dk, dv = carry
        k, v, dk, dv = lax.ppermute((k, v, dk, dv), axis, _ring_perm(c))
        dqi, dki, dvi = _bwd(q, k, v, lse, delta, do, scale, bq, bk, _valid(axis, c, i, Lc, total))
        return dq + dqi, k, v, dk + dki, dv + dvi

    dq, _, _, dk, dv = lax.fori_loop(1, c, hop, (dq, k, v, dk, dv))
    dk, dv = lax.ppermute((dk, dv), axis, _ring_perm(c))  # the key/value gradients go home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring.defvjp(_ring_vjp_fwd, _ring_vjp_bwd)


# ------------------------------------------------------------------------------------------------ shard_map


def _axis_size(mesh, name) -> int:
    return int(dict(mesh.shape).get(name, 1)) if mesh is not None else 1


def _fitting_axes(mesh, names, n) -> tuple:
    """The longest prefix of ``names`` (present in ``mesh``) whose size product divides ``n``."""
    out, prod = [], 1
    for a in names:
        s = _axis_size(mesh, a)
        if a not in dict(mesh.shape) or s == 1:
            continue
        if n % (prod * s):
            break
        out.append(a)
        prod *= s
    return tuple(out)


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _batch_head_specs(mesh, B, H):
    batch = _fitting_axes(mesh, BATCH_AXES, B) or None
    heads = HEAD_AXIS if _axis_size(mesh, HEAD_AXIS) > 1 and H % _axis_size(mesh, HEAD_AXIS) == 0 else None
    return batch, heads


def kernel_attention(q, k, v, kernel: str, scale: float | None = None, block_q: int = 512, block_k: int = 512,
                     mesh=None):
    """A fused kernel (``splash`` / ``cudnn``, see :mod:`svi_jax.models.attention_kernels`) run per device: inside
    ``shard_map`` with the batch over ``data``/``fsdp`` and heads over ``tensor`` when a mesh with more than one
    device is in context (a Pallas / cuDNN call cannot be split by the compiler itself), as Ulysses when the
    ``context`` axis is > 1, directly otherwise."""
    fn = local_kernel(kernel)
    mesh = mesh if mesh is not None else _context_mesh()
    scale = float(1.0 / np.sqrt(q.shape[-1])) if scale is None else float(scale)
    if mesh is None or math.prod(dict(mesh.shape).values()) == 1:
        return fn(q, k, v, scale, block_q, block_k)
    if _axis_size(mesh, CONTEXT_AXIS) > 1:
        return sequence_parallel_attention(q, k, v, "ulysses", scale, block_q, block_k, mesh, kernel=kernel)
    batch, heads = _batch_head_specs(mesh, q.shape[0], q.shape[2])
    spec = P(batch, None, heads, None)
    body = lambda q, k, v: fn(q, k, v, scale, block_q, block_k)  # noqa: E731
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def sequence_parallel_attention(q, k, v, impl: str = "ulysses", scale: float | None = None, block_q: int = 512,
                                block_k: int = 512, mesh=None, kernel: str | None = None):
    """Attention with the query sequence sharded over the ``context`` mesh axis (see the module docstring).

    ``kernel``: the per-device attention (``splash``, ``cudnn`` or ``flash``; default: the platform's, see
    ``attention_kernels.backend_kernel``). Ring hops always use the blockwise JAX kernel here (the ring merges
    per-hop log-sum-exps and needs each hop's backward given the final one, which the fused kernels do not
    expose)."""
    if impl not in SEQUENCE_PARALLEL_IMPLS:
        raise ValueError(f"sequence-parallel attention must be one of {SEQUENCE_PARALLEL_IMPLS}, got {impl!r}")
    mesh = mesh if mesh is not None else _context_mesh()
    kernel = kernel or backend_kernel()
    fn = local_kernel(kernel)
    c = _axis_size(mesh, CONTEXT_AXIS)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = float(1.0 / np.sqrt(D)) if scale is None else float(scale)
    if c == 1:
        if kernel == "flash":
            return flash_attention(q, k, v, scale, block_q, block_k)
        return kernel_attention(q, k, v, kernel, scale, block_q, block_k, mesh)
    batch, heads = _batch_head_specs(mesh, B, H)
    h_local = H // (_axis_size(mesh, HEAD_AXIS) if heads else 1)
    self_attn = Lk == Lq
    pad = (-Lq) % c  # ragged sequence: pad to a multiple of c, padded keys are masked, padded queries dropped
    if pad:
        padded = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
        q = padded(q)
        if self_attn:
            k, v = padded(k), padded(v)
    q_spec = P(batch, CONTEXT_AXIS, heads, None)
    kv_spec = q_spec if self_attn else P(batch, None, heads, None)

    if not self_attn:  # cross-attention: the short context is replicated over 'context'; only queries are split
        def body(q, k, v):
            return fn(q, k, v, scale, block_q, block_k)
    elif impl == "ulysses":
        if h_local % c:
            raise ValueError(f"ulysses attention needs the heads per tensor shard ({h_local}) divisible by the "
                             f"context axis size {c}; use attention='ring' or another mesh")

        def body(q, k, v):
            fwd = lambda x: lax.all_to_all(x, CONTEXT_AXIS, 2, 1, tiled=True)  # noqa: E731  [b,L/c,h,D]->[b,L,h/c,D]
            o = fn(fwd(q), fwd(k), fwd(v), scale, block_q, block_k, kv_len=Lq if pad else None)
            return lax.all_to_all(o, CONTEXT_AXIS, 1, 2, tiled=True)
    else:
        def body(q, k, v):
            bq, bk = _block_size(q.shape[1], block_q), _block_size(k.shape[1], block_k)
            o = _ring(_to_bhld(q), _to_bhld(k), _to_bhld(v), scale, bq, bk, CONTEXT_AXIS, c, Lq)
            return _to_bhld(o)

    o = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                      check_vma=False)(q, k, v)
    return o[:, :Lq] if pad else o
