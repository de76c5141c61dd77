"""Every video the project reads or writes, through the ffmpeg binary shipped with ``imageio-ffmpeg`` (one
:func:`ffmpeg_exe`, one writer :func:`write_video`, one reader :func:`read_video` on :func:`decode_frames`).

Reading (the training data, pose videos, the sampler's own mp4s): one ffmpeg subprocess per call (no PyAV /
OpenCV needed); frame selection, crop and resize run inside ffmpeg's filter graph and frames arrive as raw RGB24 on
a pipe. :func:`probe_video` decodes a whole file once and reports what decodes.

Writing: :func:`write_video` encodes uint8 frames (H.264 by default). The long-video sampler's output grows clip by
clip and is never left half-written: each finished clip is encoded once as its own H.264 segment
(:func:`write_mp4` = ``write_video(..., segment=True)``); the stitched video is the segments joined without
re-encoding (:func:`concat_mp4`: ffmpeg's concat demuxer, stream copy) into a temporary file that then replaces
the output with ``os.replace`` -- atomic on POSIX, so a reader (or a crash at any moment) sees either the previous
complete video or the new one. Rewriting the stitched file costs a copy, not an encode.

Segments have no B-frames (``-bf 0``): joined by stream copy, B-frame delays at the seams make players misjudge
the frame rate. Segment encoding is deterministic for a given ffmpeg build and settings (libx264 is deterministic
unless told otherwise; ``bitexact`` flags and ``-map_metadata -1`` keep version strings and timestamps out), so the
same frames give the same bytes.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


class VideoError(Exception):
    """A video that cannot be used; `reason` is a short machine-readable tag counted in summaries."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # frames that actually decode
    height: int  # decoded (display, i.e. after rotation) size
    width: int
    fps: float
    codec: str
    pix_fmt: str
    decode_errors: int  # error lines ffmpeg printed while decoding everything

    @property
    def grayscale(self) -> bool:
        return self.pix_fmt.startswith(("gray", "ya", "mono"))


_FFMPEG = None


def ffmpeg_exe() -> str:
    global _FFMPEG
    if _FFMPEG is None:
        import imageio_ffmpeg

        _FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
    return _FFMPEG


_SIZE_RE = re.compile(r",\s*(\d+)x(\d+)(?=[\s,\[]|$)")
_FPS_RE = re.compile(r"([\d.]+)(k?) fps")
_TBR_RE = re.compile(r"([\d.]+)(k?) tbr")
_FRAME_RE = re.compile(r"^frame=\s*(\d+)", re.M)


def _stream_line(lines: Sequence[str], section: str) -> Optional[str]:
    """First 'Stream ... Video:' line after the line starting with `section` ('Input #0' / 'Output #0')."""
    inside = False
    for line in lines:
        body = line.split("] ", 1)[-1] if line.startswith("[") else line
        if body.lstrip().startswith(section):
            inside = True
            continue
        if inside and "Stream #" in body and "Video:" in body:
            return body
    return None


def probe_video(path: str, timeout: float = 600.0) -> VideoInfo:
    """Decode the whole video once (no output) and report what decodes. Raises VideoError.

    Counts decoded frames (not container packets), so truncated/corrupt files report what is really
    usable, and records how many decode errors ffmpeg printed.
    """
    if not os.path.exists(path):
        raise VideoError("missing_file", path)
    if os.path.getsize(path) == 0:
        raise VideoError("empty_file", path)
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "level+info", "-threads", "1",
           "-i", path, "-map", "0:v:0", "-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, close_fds=False)  # posix_spawn, no fork
    except subprocess.TimeoutExpired:
        raise VideoError("timeout", f"decoding took more than {timeout:.0f}s")
    err = res.stderr.decode("utf-8", "replace")
    lines = err.splitlines()
    errors = [ln for ln in lines if "[error]" in ln or "[fatal]" in ln]
    inp = _stream_line(lines, "Input #0")
    if inp is None:
        if "Input #0" in err:
            raise VideoError("no_video_stream", _last(errors))
        raise VideoError("unreadable", _last(errors) or f"ffmpeg exit code {res.returncode}")
    frames = [int(m) for m in _FRAME_RE.findall(res.stdout.decode("utf-8", "replace"))]
    num_frames = frames[-1] if frames else 0
    if res.returncode != 0 and num_frames == 0:
        raise VideoError("unreadable", _last(errors) or f"ffmpeg exit code {res.returncode}")
    out = _stream_line(lines, "Output #0") or inp
    m = _SIZE_RE.search(out) or _SIZE_RE.search(inp)
    if m is None:
        raise VideoError("unreadable", f"no frame size in: {inp.strip()}")
    width, height = int(m.group(1)), int(m.group(2))
    fps = 0.0
    for regex in (_FPS_RE, _TBR_RE):
        m = regex.search(inp)
        if m and fps <= 0:
            fps = float(m.group(1)) * (1000.0 if m.group(2) else 1.0)
    codec_m = re.search(r"Video:\s*([\w-]+)", inp)
    pix_m = re.search(r"Video:[^,]*,\s*([a-z0-9_]+)", inp)
    return VideoInfo(num_frames=num_frames, height=height, width=width, fps=fps or 24.0,
                     codec=codec_m.group(1) if codec_m else "?", pix_fmt=pix_m.group(1) if pix_m else "?",
                     decode_errors=len(errors))


def _last(errors: Sequence[str]) -> str:
    return errors[-1].split("] ", 1)[-1].strip() if errors else ""


def decode_frames(path: str, *, start: int, count: int, stride: int = 1,
                  crop: Optional[tuple[int, int, int, int]] = None,
                  size: Optional[tuple[int, int]] = None, src_size: Optional[tuple[int, int]] = None,
                  fps: Optional[float] = None, seek: bool = True, threads: int = 0,
                  timeout: float = 600.0) -> np.ndarray:
    """Frames start, start+stride, ... (`count` of them) as uint8 [n, H, W, 3], n <= count.

    crop: (x, y, w, h) in decoded pixels, applied before resizing to size=(H, W) (bilinear, antialiased
    when shrinking). src_size=(H, W) of the decoded video is needed when neither crop nor size is given.
    With seek and fps known, ffmpeg seeks to the first frame's timestamp (half a frame early) instead of
    decoding from the start; the caller should fall back to seek=False if fewer frames come back.
    """
    if count <= 0:
        raise ValueError("count must be positive")
    filters = []
    use_seek = seek and start > 0 and fps
    first = 0 if use_seek else start
    last = first + (count - 1) * stride
    sel = f"gte(n\\,{first})*lte(n\\,{last})" + (f"*not(mod(n-{first}\\,{stride}))" if stride > 1 else "")
    if first > 0 or stride > 1:
        filters.append(f"select='{sel}'")
    filters.append("format=rgb24")
    if crop is not None:
        x, y, w, h = crop
        filters.append(f"crop={w}:{h}:{x}:{y}:exact=1")
        out_h, out_w = h, w
    elif src_size is not None:
        out_h, out_w = src_size
    elif size is None:
        raise ValueError("need crop, size or src_size to know the output frame size")
    if size is not None:
        out_h, out_w = size
        filters.append(f"scale={out_w}:{out_h}:flags=bilinear+accurate_rnd+full_chroma_int+full_chroma_inp")
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", str(threads)]
    if use_seek:
        cmd += ["-ss", f"{max(0.0, (start - 0.5) / fps):.6f}"]
    cmd += ["-i", path, "-map", "0:v:0", "-vf", ",".join(filters), "-fps_mode", "passthrough",
            "-frames:v", str(count), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, close_fds=False)  # posix_spawn, no fork
    except subprocess.TimeoutExpired:
        raise VideoError("timeout", f"decoding took more than {timeout:.0f}s")
    frame_bytes = out_h * out_w * 3
    n = len(res.stdout) // frame_bytes
    if n == 0:
        raise VideoError("decode_failed", res.stderr.decode("utf-8", "replace").strip()[-500:])
    return np.frombuffer(res.stdout, np.uint8, count=n * frame_bytes).reshape(n, out_h, out_w, 3)


def decode_bytes(data: bytes, suffix: str = ".mp4", **kwargs) -> np.ndarray:
    """decode_frames() on an in-memory file (mp4 needs a seekable input, so not a pipe).

    Linux: an anonymous memfd that ffmpeg opens as /proc/self/fd/N (inherited) -- nothing on disk, nothing left
    behind if the process is killed. Elsewhere: a temporary file.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("svi_clip", 0)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.set_inheritable(fd, True)
            return decode_frames(f"/proc/self/fd/{fd}", **kwargs)
        finally:
            os.close(fd)
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data)
        f.flush()
        return decode_frames(f.name, **kwargs)


def read_video(path: str) -> np.ndarray:
    """Every frame of a video at its decoded size, uint8 ``[T, H, W, 3]`` (``[0, H, W, 3]`` when none decodes)."""
    info = probe_video(path)
    if info.num_frames == 0:
        return np.zeros((0, info.height, info.width, 3), np.uint8)
    return decode_frames(path, start=0, count=info.num_frames, seek=False, src_size=(info.height, info.width))


def read_mp4(path: str) -> np.ndarray:
    """All frames of a video as uint8 ``[T, H, W, 3]`` (:func:`read_video`)."""
    return read_video(path)


def decode_all(path: str) -> np.ndarray:
    """Every frame at native size, uint8 [T, H, W, 3] (:func:`read_video`; for tests and small files)."""
    return read_video(path)


def count_frames(path: str) -> int:
    """Frames that decode (:func:`probe_video`)."""
    return probe_video(path).num_frames


# ------------------------------------------------------------------------------------------------ writing


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


def write_video(path: str, frames, fps: float = 16.0, crf: int = 17, pix_fmt: str = "yuv420p",
                codec: str = "libx264", timeout: float = 600.0, *, preset: str = "medium",
                segment: bool = False) -> str:
    """Encode uint8 ``[T, H, W, 3]`` (or ``[T, H, W]`` grayscale) frames; returns ``path``.

    ``segment=False`` (datasets, pose videos): ``codec`` / ``pix_fmt`` as given (yuv420p needs even sizes; use
    ``pix_fmt='yuv444p'`` or ``codec='ffv1'`` for odd ones), written in place, :class:`VideoError` on failure; the
    frames go through one pipe (posix_spawn: no fork of a threaded JAX process).
    ``segment=True`` (:func:`write_mp4`): a stitchable H.264 yuv420p segment of RGB frames (``frames`` may also be
    an iterable of ``[t, H, W, 3]`` chunks), odd sizes padded to even, no B-frames, deterministic bytes, written
    atomically, ``RuntimeError`` on failure."""
    if segment:
        return _write_segment(path, [frames] if isinstance(frames, np.ndarray) else list(frames), fps, crf, preset)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"write_video wants uint8 frames, got {frames.dtype}")
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3):
        raise ValueError(f"write_video wants [T, H, W, 3] or [T, H, W], got {frames.shape}")
    gray = frames.ndim == 3
    t, h, w = frames.shape[:3]
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
           "-pix_fmt", "gray" if gray else "rgb24", "-s", f"{w}x{h}", "-r", f"{fps}", "-i", "pipe:0",
           "-an", "-c:v", codec, "-pix_fmt", pix_fmt]
    if codec == "libx264":
        cmd += ["-crf", str(crf), "-preset", preset]
    res = subprocess.run(cmd + [path], input=np.ascontiguousarray(frames).tobytes(), capture_output=True,
                         timeout=timeout, close_fds=False)
    if res.returncode != 0:
        raise VideoError("write_failed", res.stderr.decode("utf-8", "replace").strip()[-500:])
    return path


def _write_segment(path: str, chunks: list, fps: float, crf: int, preset: str) -> str:
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


def write_mp4(path: str, frames, fps: float = 24.0, crf: int = 17, preset: str = "medium") -> str:
    """Encode ``frames`` (uint8 ``[T, H, W, 3]``, or an iterable of such chunks) as a stitchable H.264 yuv420p
    segment, atomically (:func:`write_video` with ``segment=True``)."""
    return write_video(path, frames, fps, crf, preset=preset, segment=True)


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
