"""Deprecated alias (one release): use :mod:`svi_jax.video_io` (the one video I/O module: probing, decoding,
writing)."""
# Deprecated alias (one release): use svi_jax.video_io
from svi_jax.video_io import (VIDEO_EXTENSIONS, VideoError, VideoInfo, decode_all, decode_bytes,  # noqa: F401
                              decode_frames, ffmpeg_exe, probe_video, write_video)
