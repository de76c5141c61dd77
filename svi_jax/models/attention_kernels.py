"""Fused attention kernels: Pallas splash attention (TPU) and cuDNN flash attention (GPU).

Layout: ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` -> ``[B, Lq, H, D]`` in the dtype of ``q``; no mask in Wan, so
the only masking is of the padding that the kernels need (and of a ragged sequence split over ``context``).

* :func:`splash_attention`: ``jax.experimental.pallas.ops.tpu.splash_attention`` (one kernel per example, vmapped
  over the batch). Each sequence is padded to a multiple of its block size; padded *keys* get segment id 1 (the
  queries all have 0), so no query puts weight on them (exact, not a large negative bias); padded queries are
  dropped. Block sizes: ``block_q`` / ``block_kv`` from the config (``DiTConfig.attention_block_q`` /
  ``attention_block_kv``, default 512, as maxdiffusion uses for Wan), rounded to multiples of 128 (the TPU lane
  width) and capped at the padded length, so a 257-key image context uses one 384 block, 512 text keys one 512
  block, and 32,760 video tokens 64 blocks of 512 (8 padded keys). The backward is the fused dq/dk/dv kernel. Off
  TPU the kernel runs in Pallas ``interpret`` mode (plain JAX ops; slow, for tests on CPU). The output and the
  log-sum-exp are tagged ``attention_residuals`` (``checkpoint_name``) for the remat policies.
* :func:`cudnn_attention`: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN's fused flash
  attention). cuDNN takes bf16/fp16 only: fp32 inputs are cast to bf16 and the output cast back. Key padding (a
  ragged sequence split over ``context``) is masked with ``key_value_seq_lengths``.

``attention_parallel.local_kernel(name)`` gives the function ``(q, k, v, scale, block_q, block_kv, kv_len) -> o`` that the
sequence-parallel wrappers (:mod:`svi_jax.models.attention_parallel`) run on each device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LANE = 128                        # TPU vector lane width: splash block sizes are multiples of it
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
RESIDUAL_NAME = "attention_residuals"   # checkpoint_name of splash's saved output and log-sum-exp


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_block(length: int, target: int) -> int:
    """Block size for a sequence of ``length``: ``target`` rounded to a multiple of 128, capped at ``length``
    rounded up to 128 (then the sequence is padded to a multiple of the block)."""
    target = max(LANE, _round_up(int(target), LANE))
    return min(target, _round_up(length, LANE))


def platform() -> str:
    """The platform the program being traced is for: the mesh in context (``jax.set_mesh``; e.g. a TPU topology
    compiled ahead of time on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def traced_num_devices() -> int:
    """Devices of the mesh in context (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh is None or mesh.empty else int(mesh.size)


def _splash_kernel(heads: int, lq: int, lk: int, bq: int, bkv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.FullMask((lq, lk))] * heads)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    # built in the caller's trace (not cached: its block-mask tables are arrays of that trace)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name=RESIDUAL_NAME, interpret=interpret)


def splash_attention(q, k, v, scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
                     block_kv: int = DEFAULT_BLOCK_KV, kv_len: int | None = None, interpret: bool | None = None):
    """Exact softmax attention with the Pallas splash kernel; only the first ``kv_len`` (static) keys count."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    valid = Lk if kv_len is None else int(kv_len)
    scale = float(1.0 / np.sqrt(D)) if scale is None else float(scale)
    interpret = (platform() != "tpu") if interpret is None else bool(interpret)
    bq, bkv = splash_block(Lq, block_q), splash_block(Lk, block_kv)
    lq, lk = _round_up(Lq, bq), _round_up(Lk, bkv)
    heads_first = lambda t, n: jnp.pad(jnp.swapaxes(t, 1, 2), ((0, 0), (0, 0), (0, n - t.shape[1]), (0, 0)))  # noqa
    qh = heads_first(q * jnp.asarray(scale, q.dtype), lq)
    kh, vh = heads_first(k, lk), heads_first(v.astype(q.dtype), lk)
    kernel = _splash_kernel(H, lq, lk, bq, bkv, interpret)
    seg = None
    if valid < lk:  # padded keys: their own segment, so no query attends to them
        seg = sa.SegmentIds(q=jnp.zeros((lq,), jnp.int32), kv=(jnp.arange(lk) >= valid).astype(jnp.int32))
    o = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=seg))(qh, kh.astype(q.dtype), vh)
    return jnp.swapaxes(o[:, :, :Lq], 1, 2).astype(q.dtype)


def cudnn_attention(q, k, v, scale: float | None = None, block_q: int = 0, block_kv: int = 0,
                    kv_len: int | None = None):
    """cuDNN flash attention (bf16/fp16; fp32 is computed in bf16); only the first ``kv_len`` keys count."""
    del block_q, block_kv  # cuDNN picks its own tiles
    dt = q.dtype
    cdt = dt if dt in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    scale = float(1.0 / np.sqrt(q.shape[-1])) if scale is None else float(scale)
    lengths = None
    if kv_len is not None and int(kv_len) < k.shape[1]:
        lengths = jnp.full((q.shape[0],), int(kv_len), jnp.int32)
    o = jax.nn.dot_product_attention(q.astype(cdt), k.astype(cdt), v.astype(cdt), scale=scale,
                                     key_value_seq_lengths=lengths, implementation="cudnn")
    return o.astype(dt)


def backend_kernel(plat: str | None = None) -> str:
    """The fused kernel of a platform: ``splash`` on TPU, ``cudnn`` on GPU, ``flash`` (blockwise JAX) elsewhere."""
    plat = plat or platform()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "flash"}.get(plat, "flash")
