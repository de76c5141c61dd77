"""Data pipeline: video folders -> TFDS (array_record) -> sampled training clips; latent cache; synthetic clips.

    from svi_jax.data import build_dataset, ClipLoader, default_config
    build_dataset("videos/", "ds/")                      # or: python -m svi_jax.data build --videos videos/ --out ds/
    loader = ClipLoader("ds/", default_config(num_frames=81, height=480, width=832, batch_size=8))
    batch = next(loader)                                  # video, cond, first_frame, num_cond, caption, index, epoch
    state = loader.get_state(); loader.set_state(state)  # resumable; host i of n reads its own shard

Submodules load lazily (TFDS is imported only by the builder / data source).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "default_config": "config", "film_config": "config",
    "build_dataset": "builder", "open_dataset": "builder", "dataset_dir": "builder", "SviVideos": "builder",
    "format_summary": "builder",
    "ClipLoader": "loader", "make_loader": "loader", "ShardOrder": "loader", "BatchIterator": "loader",
    "state_to_array": "loader", "state_from_array": "loader",
    "ClipPlan": "sampling", "plan_clip": "sampling", "assemble": "sampling",
    "scan_folder": "scan", "read_caption_csv": "scan", "CaptionError": "scan",
    "VideoError": "video", "VideoInfo": "video", "probe_video": "video", "decode_frames": "video",
    "write_video": "video",
    "make_sequence": "synthetic", "write_dataset": "synthetic",
    "Encoders": "cache", "write_cache": "cache", "LatentLoader": "cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"svi_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'svi_jax.data' has no attribute {name!r}")
