"""mp4 output that grows clip by clip and is never left half-written.

Each finished clip is encoded once, as its own H.264 segment (``write_mp4``); the stitched video is the segments
joined without re-encoding (``concat_mp4``: ffmpeg's concat demuxer, stream copy) into a temporary file that then
replaces the output with ``os.replace`` -- atomic on POSIX, so a reader (or a crash at any moment) sees either the
previous complete video or the new one. Rewriting the stitched file costs a copy, not an encode.

Segments have no B-frames (``-bf 0``): joined by stream copy, B-frame delays at the seams make players misjudge
the frame rate. Encoding is deterministic for a given ffmpeg build and settings (libx264 is deterministic unless
told otherwise; ``bitexact`` flags and ``-map_metadata -1`` keep version strings and timestamps out), so the same
frames give the same bytes. The ffmpeg binary is the one shipped with ``imageio-ffmpeg``.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Iterable, Sequence

import numpy as np


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _tmp_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp" + os.path.splitext(base)[1], dir=d)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600; give the usual permissions
    return tmp


def _run(cmd: list[str], stdin_bytes: Iterable[bytes] | None = None) -> None:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_bytes is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = b""
    try:
        if stdin_bytes is not None:
            for chunk in stdin_bytes:
                proc.stdin.write(chunk)
            proc.stdin.close()
        err = proc.stderr.read()
    finally:
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"ffmpeg failed ({rc}): {' '.join(cmd)}\n{err.decode(errors='replace')[-2000:]}")


def write_mp4(path: str, frames, fps: float = 24.0, crf: int = 17, preset: str = "medium") -> str:
    """Encode ``frames`` (uint8 ``[T, H, W, 3]``, or an iterable of such chunks) as H.264 yuv420p, atomically."""
    chunks = [frames] if isinstance(frames, np.ndarray) else list(frames)
    if not chunks:
        raise ValueError("no frames to write")
    h, w = chunks[0].shape[1:3]
    for c in chunks:
        if c.dtype != np.uint8 or c.ndim != 4 or c.shape[1:] != (h, w, 3):
            raise ValueError(f"frames must be uint8 [T, {h}, {w}, 3], got {c.dtype} {c.shape}")
    vf = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"] if (h % 2 or w % 2) else []
    tmp = _tmp_path(path)
    try:
        _run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
              "-r", f"{fps}", "-i", "-", *vf, "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
              "-pix_fmt", "yuv420p", "-bf", "0", "-threads", "1", "-map_metadata", "-1", "-fflags", "+bitexact",
              "-flags:v", "+bitexact", "-f", "mp4", tmp],
             (np.ascontiguousarray(c).tobytes() for c in chunks))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def concat_mp4(parts: Sequence[str], path: str) -> str:
    """Join mp4 segments of identical encoding settings into ``path`` without re-encoding, atomically."""
    if not parts:
        raise ValueError("no segments to join")
    if len(parts) == 1:                       # a plain copy (still atomic)
        tmp = _tmp_path(path)
        try:
            with open(parts[0], "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    tmp = _tmp_path(path)
    lst = tmp + ".txt"
    try:
        with open(lst, "w") as f:
            for p in parts:
                f.write("file '" + os.path.abspath(p).replace("'", "'\\''") + "'\n")
        _run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i", lst, "-c", "copy",
              "-map_metadata", "-1", "-fflags", "+bitexact", "-f", "mp4", tmp])
        os.replace(tmp, path)
    finally:
        for p in (tmp, lst):
            if os.path.exists(p):
                os.unlink(p)
    return path


def read_mp4(path: str) -> np.ndarray:
    """All frames of a video as uint8 ``[T, H, W, 3]``."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", output_params=["-fps_mode", "passthrough"])
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


def count_frames(path: str) -> int:
    import imageio_ffmpeg

    return imageio_ffmpeg.count_frames_and_secs(path)[0]


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_savez(path: str, **arrays) -> None:
    """``np.savez`` to a temporary file, then ``os.replace`` (``path`` should end in ``.npz``)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
