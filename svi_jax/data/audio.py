"""Audio windows of SVI-Talk (official ``cut_audio_embedding`` = ``get_audio_embedding`` + ``preprocess_audio``,
``utils/audio_process.py`` L78-106), pure array code shared by the training loader (:mod:`svi_jax.data.loader`)
and the sampler (:mod:`svi_jax.talk`)."""
from __future__ import annotations

import numpy as np

FPS = 25
AUDIO_WINDOW = 5
VAE_SCALE = 4


def frame_windows(emb, start: int, num_frames: int, window: int = AUDIO_WINDOW):
    """``emb [T25, L, C]`` -> ``[num_frames, window, L, C]``: frame ``i`` gets steps ``start + i + (-2..2)``,
    clamped to ``[0, T25 - 1]``."""
    half = window // 2
    idx = np.arange(start, start + num_frames)[:, None] + (np.arange(window) - half)[None, :]
    idx = np.clip(idx, 0, emb.shape[0] - 1)
    return emb[idx]


def split_windows(win, vae_scale: int = VAE_SCALE):
    """``[T, window, L, C]`` (T = 1 + 4k) -> ``(first [1, window, L, C], later [k, window + vae_scale - 1, L, C])``."""
    t, w = win.shape[:2]
    if (t - 1) % vae_scale:
        raise ValueError(f"{t} frames is not 1 + {vae_scale}k")
    mid = w // 2
    first = win[:1]
    later = win[1:].reshape(((t - 1) // vae_scale, vae_scale) + win.shape[1:])
    cat = np.concatenate
    if not isinstance(win, np.ndarray):          # a jax array (the sampler)
        import jax.numpy as jnp

        cat = jnp.concatenate
    parts = [later[:, 0, : mid + 1]]                                             # first frame of a group: <= centre
    if vae_scale > 2:
        parts.append(later[:, 1:-1, mid])                                        # middle frames: the centre
    parts.append(later[:, -1, mid:])                                             # last frame: >= centre
    return first, cat(parts, axis=1)


def audio_windows(emb, start: int, num_frames: int, window: int = AUDIO_WINDOW, vae_scale: int = VAE_SCALE):
    """The official ``cut_audio_embedding(emb, num_frames, audio_start_idx=start)`` on ``emb [T25, L, C]``."""
    return split_windows(frame_windows(emb, start, num_frames, window), vae_scale)
