"""Rematerialisation policies of the DiT blocks (``DiTConfig.remat_policy``).

* ``full`` (= ``nothing_saveable``): only the block inputs are kept; the backward recomputes the whole block,
  attention forward included (about 0.88 PFLOP per 14B clip at 32,760 tokens).
* ``save_attention``: ``jax.checkpoint_policies.save_only_these_names`` of the attention outputs
  (``attention_out``, tagged in ``layers.attention``) and of the tensors the attention VJPs need
  (``attention_residuals``: the output and log-sum-exp inside ``per_head`` / ``flash`` / splash, whose kernel
  exposes them through ``residual_checkpoint_name``). The backward recomputes the projections, norms and FFN but
  not the attention forward. Extra memory per layer: the output ``[B, L, H, D]`` (twice: before and after the
  output projection's input reshape share it) plus the log-sum-exp ``[B, H, L]`` fp32. cuDNN keeps its softmax
  statistics inside its own VJP (not named), so on GPU only the outputs are saved and cuDNN's forward runs again.
* ``offload_attention``: the same names, moved to pinned host memory after the forward and back for the backward
  (``save_and_offload_only_these_names``), where the devices have a ``pinned_host`` memory space (TPU, GPU;
  elsewhere it falls back to ``save_attention`` with a warning).
* ``dots_saveable``, ``everything_saveable``, ...: JAX's own policies by name; ``none``: no remat.
"""
from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)

SAVED_NAMES = ("attention_out", "attention_residuals")


def has_pinned_host() -> bool:
    try:
        return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())
    except Exception:  # noqa: BLE001 - backends without memory spaces
        return False


def checkpoint_policy(name: str):
    """The ``jax.checkpoint`` policy of a ``REMAT_POLICIES`` value."""
    cp = jax.checkpoint_policies
    if name == "save_attention":
        return cp.save_only_these_names(*SAVED_NAMES)
    if name == "offload_attention":
        if not has_pinned_host():
            log.warning("remat_policy='offload_attention': no pinned_host memory on %s; saving on the device "
                        "instead (save_attention)", jax.default_backend())
            return cp.save_only_these_names(*SAVED_NAMES)
        return cp.save_and_offload_only_these_names(names_which_can_be_saved=(),
                                                    names_which_can_be_offloaded=SAVED_NAMES,
                                                    offload_src="device", offload_dst="pinned_host")
    return getattr(cp, name)
