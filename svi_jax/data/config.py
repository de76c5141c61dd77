"""Data configuration (ml_collections) for clip sampling and loading."""
from __future__ import annotations

import ml_collections

PAD_MODES = ("ref", "zero", "mix")


def default_config(**overrides) -> ml_collections.ConfigDict:
    """Clip sampling + loader settings. Defaults are the official SVI-Shot ones at 81x480x832.

    num_frames / height / width: the training window (T, H, W).
    frame_stride: maximum stride; each clip draws its stride uniformly from 1..frame_stride.
    num_motion_frames: condition frames (1 Shot, 5 Film); with probability p_motion all of them are real
      frames, otherwise only the first.
    pad_mode: 'ref' fills the rest of `cond` with one random frame of the same window (Shot/Talk/Dance),
      'zero' with zeros (Film), 'mix' either, by a fair coin per clip (a base that must serve both, e.g. the
      tiny drift base).
    seed: shuffling and augmentation seed. batch_size: the GLOBAL batch; each of n hosts yields batch_size/n.
    num_workers: clips decoded concurrently (threads driving ffmpeg subprocesses); prefetch: batches ahead.
    decode_threads: ffmpeg -threads per decode (0 = ffmpeg's choice). seek: seek by timestamp to the window.
    """
    c = ml_collections.ConfigDict()
    c.num_frames = 81
    c.height = 480
    c.width = 832
    c.frame_stride = 1
    c.num_motion_frames = 1
    c.p_motion = 0.9
    c.pad_mode = "ref"
    c.seed = 0
    c.batch_size = 1
    c.shuffle = True
    c.num_workers = 2
    c.prefetch = 2
    c.decode_threads = 0
    c.seek = True
    c.max_retries = 8
    from svi_jax.config_schema import DATA, unknown_key

    for key in overrides:
        if key not in DATA:
            raise unknown_key("data", key, DATA)
    c.update(overrides)
    return c


def film_config(**overrides) -> ml_collections.ConfigDict:
    """SVI-Film: 5 motion frames, zero padding."""
    return default_config(**{"num_motion_frames": 5, "pad_mode": "zero", **overrides})


def validate(cfg) -> None:
    if cfg.pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {cfg.pad_mode!r}")
    if cfg.num_frames < 1 or cfg.height < 1 or cfg.width < 1:
        raise ValueError(f"num_frames/height/width must be positive, got {cfg.num_frames}/{cfg.height}/{cfg.width}")
    if not 1 <= cfg.num_motion_frames <= cfg.num_frames:
        raise ValueError(f"num_motion_frames must be in 1..num_frames, got {cfg.num_motion_frames}")
    if cfg.frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {cfg.frame_stride}")
    if not 0.0 <= cfg.p_motion <= 1.0:
        raise ValueError(f"p_motion must be in [0, 1], got {cfg.p_motion}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
