"""MultiTalk audio layers of SVI-Talk's Wan DiT (official ``diffsynth/models/wan_video_dit.py`` with
``enable_multitalk=True``; ``diffsynth/models/attention.py``).

* :class:`AudioProjModel` (``audio_proj``): the windowed wav2vec2 features of one clip -> ``audio_tokens`` (32)
  tokens of width ``audio_dim`` (768) per latent frame. First latent frame: ``[5, 12, 768]`` -> ``proj1`` (46080 ->
  512); every later latent frame: ``[8, 12, 768]`` -> ``proj1_vf`` (73728 -> 512); ReLU, concat over frames,
  ``proj2`` (512 -> 512) + ReLU, ``proj3`` (512 -> 32 * 768), LayerNorm(768, eps 1e-5, affine).
* :class:`SingleStreamAttention` (``blocks.i.audio_cross_attn``): each latent frame's ``h * w`` video tokens attend
  to that frame's 32 audio tokens only; ``q_linear`` dim -> dim, ``kv_linear`` 768 -> 2 dim (K then V),
  ``proj`` dim -> dim, all with bias; no q/k norm, no RoPE. The official code runs batch 1; this takes any batch
  (frames are folded into the batch axis).

The DiT block calls it as ``x += audio_cross_attn(norm_x(x))`` after the text/CLIP cross-attention and before the
FFN (``norm_x``: affine float32 LayerNorm with the DiT's eps, no gate); see ``svi_jax.models.dit.Block``.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import flax.linen as nn

from svi_jax.models.layers import Linear, LayerNorm, attention, dtype_of


def audio_input_shapes(cfg, latent_frames: int, batch: int = 1):
    """Shapes of ``(first, later)`` audio windows for ``latent_frames`` latent frames:
    ``[B, 1, window, layers, in_dim]`` and ``[B, F-1, window + vae_scale - 1, layers, in_dim]``."""
    w, n = cfg.audio_window, cfg.audio_vae_scale
    return ((batch, 1, w, cfg.audio_layers, cfg.audio_in_dim),
            (batch, latent_frames - 1, w + n - 1, cfg.audio_layers, cfg.audio_in_dim))


class AudioProjModel(nn.Module):
    """``(first [B, 1, 5, 12, 768], later [B, F-1, 8, 12, 768])`` -> ``[B, F, 32, 768]`` audio tokens."""

    cfg: "object"  # DiTConfig

    @nn.compact
    def __call__(self, first, later):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        lin = lambda n, axes, name: Linear(n, axes, dtype=dt, param_dtype=pdt, name=name)  # noqa: E731
        b = first.shape[0]
        a = jax.nn.relu(lin(cfg.audio_hidden, ("kv", None), "proj1")(first.reshape(b, first.shape[1], -1)))
        if later.shape[1]:
            v = jax.nn.relu(lin(cfg.audio_hidden, ("kv", None), "proj1_vf")(later.reshape(b, later.shape[1], -1)))
            a = jnp.concatenate([a, v], axis=1)
        elif self.is_initializing():
            raise ValueError("initialise the audio projection with at least 2 latent frames")
        a = jax.nn.relu(lin(cfg.audio_hidden, (None, None), "proj2")(a))
        tok = lin(cfg.audio_tokens * cfg.audio_dim, (None, "mlp"), "proj3")(a)
        tok = tok.reshape(b, a.shape[1], cfg.audio_tokens, cfg.audio_dim)
        return LayerNorm(1e-5, affine=True, param_dtype=pdt, name="norm")(tok)


class SingleStreamAttention(nn.Module):
    """``x [B, F*S, dim]`` (S = h*w tokens per latent frame), ``audio [B, F, M, audio_dim]`` -> ``[B, F*S, dim]``."""

    cfg: "object"  # DiTConfig

    @nn.compact
    def __call__(self, x, audio):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        b, n_f = audio.shape[:2]
        if x.shape[1] % n_f:
            raise ValueError(f"{x.shape[1]} video tokens do not split into {n_f} latent frames of audio")
        lin = lambda n, axes, name: Linear(n, axes, dtype=dt, param_dtype=pdt,  # noqa: E731
                                           lora_scale=cfg.lora_scale, name=name)
        xs = einops.rearrange(x, "b (f s) c -> (b f) s c", f=n_f)
        q = lin(cfg.dim, ("embed", "heads"), "q_linear")(xs)
        kv = lin(2 * cfg.dim, ("kv", "heads"), "kv_linear")(audio.reshape(b * n_f, audio.shape[2], -1).astype(dt))
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=cfg.num_heads)  # noqa: E731
        k, v = split(kv[..., :cfg.dim]), split(kv[..., cfg.dim:])
        impl = cfg.attention if cfg.attention not in ("ulysses", "ring") else "xla"
        o = attention(split(q), k, v, impl)
        o = einops.rearrange(o, "(b f) s h d -> b (f s) (h d)", b=b)
        return lin(cfg.dim, ("heads", "embed"), "proj")(o)


def audio_tokens(cfg, audio, frames: int):
    """``audio_proj`` of the ``(first, later)`` windows -> ``[B, F, 32, 768]`` (None without audio or multitalk).
    Called inside ``WanDiT.__call__`` (the module is the DiT's child ``audio_proj``)."""
    if audio is None or not cfg.multitalk:
        return None
    first, later = audio
    if first.shape[1] + later.shape[1] != frames:
        raise ValueError(f"audio windows cover {first.shape[1] + later.shape[1]} latent frames, the latents have "
                         f"{frames}")
    return AudioProjModel(cfg, name="audio_proj")(first, later).astype(dtype_of(cfg.dtype))


def audio_branch(cfg, x, audio):
    """``audio_cross_attn(norm_x(x))`` of one DiT block (no gate). Called inside ``Block.__call__``, so the two
    modules are the block's own children (``blocks/norm_x``, ``blocks/audio_cross_attn``, as the official keys)."""
    h = LayerNorm(cfg.eps, affine=True, param_dtype=dtype_of(cfg.param_dtype), name="norm_x")(x)
    return SingleStreamAttention(cfg, name="audio_cross_attn")(h, audio)
