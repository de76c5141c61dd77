"""SVI-Dance sampling pieces: the pose stream, its clip-by-clip windows, and the dance adapter on a base DiT.

Pose windows, as ``test_svi_dance.py`` L200-288 (1 motion frame, 81-frame clips):

* a stream shorter than one clip is first tiled ``T // N + 1`` times;
* clip 0 takes pose frames ``0 .. T-1``; the cursor is then set to ``T - 1`` (80, not 81);
* clip ``k + 1`` takes the previous window's last ``m`` poses, then ``T - m`` poses from the cursor on, wrapping
  around the (tiled) stream. With ``m = 1`` the pose at each seam appears twice (the motion frame's pose and the first
  new one): for a 130-frame stream, clip 1 = ``[80, 80, 81 .. 129, 0 .. 29]``, clip 2 = ``[29, 30 .. 109]``.

Pose frames are fitted to the clip size as the official ``resize_and_pad_to_target`` (nearest resize keeping the
aspect ratio, centred zero padding). :class:`PoseStream` is the sampler's extra-condition stream for the pose: it
gives each clip its pose frames (``extra['pose']``, kept in the unconditional CFG pass as ``cond_wo_pose=True``),
its record and its resume settings.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PoseError(ValueError):
    """A pose video / directory / adapter that cannot be used (the message names it)."""


# ------------------------------------------------------------------------------------------------ schedule


def tiled_length(num_pose: int, num_frames: int = 81) -> int:
    """Length of the stream the official loop indexes: ``N``, or ``N * (T // N + 1)`` when ``N < T``."""
    if num_pose < 1:
        raise PoseError("the pose stream has no frames")
    return num_pose * (num_frames // num_pose + 1) if num_pose < num_frames else num_pose


def pose_windows(num_pose: int, num_clips: int, num_frames: int = 81, motion_frames: int = 1):
    """``(windows, cursors)``: the pose indices (into the original ``N``-frame stream) of every clip, and the
    official ``sampled_idx`` after each clip was scheduled (the position in the tiled stream)."""
    n = tiled_length(num_pose, num_frames)
    idx = np.arange(num_frames) % n
    cursor = num_frames - 1
    windows, cursors = [idx % num_pose], [cursor]
    for _ in range(1, num_clips):
        new = [idx[-motion_frames:]]
        tail = (cursor + np.arange(num_frames - motion_frames)) % n
        cursor = int((cursor + num_frames - motion_frames - 1) % n) + 1
        idx = np.concatenate(new + [tail])
        windows.append(idx % num_pose)
        cursors.append(cursor)
    return windows, cursors


# ------------------------------------------------------------------------------------------------ pose frames


def resize_and_pad(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[N, h, w, 3]`` -> ``[N, H, W, 3]``: ``F.interpolate(mode='nearest')`` to the largest size with the
    same aspect ratio, then centred zero padding (``utils/image_process.py`` ``resize_and_pad_to_target``)."""
    n, h, w, c = frames.shape
    s = min(height / h, width / w)
    nh, nw = int(h * s), int(w * s)
    # torch nearest: src = floor(dst * (in / out)) (the scale computed from the sizes), clamped
    ri = np.minimum(np.floor(np.arange(nh) * (h / nh)).astype(np.int64), h - 1)
    ci = np.minimum(np.floor(np.arange(nw) * (w / nw)).astype(np.int64), w - 1)
    out = np.zeros((n, height, width, c), frames.dtype)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, top:top + nh, left:left + nw] = frames[:, ri][:, :, ci]
    return out


def load_pose_frames(path: str) -> np.ndarray:
    """uint8 RGB ``[N, h, w, 3]`` from a pose video (mp4, ...) or a directory of images (sorted by name)."""
    from PIL import Image

    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise PoseError(f"pose directory {path} holds no images ({', '.join(IMAGE_EXTS)})")
        frames = [np.asarray(Image.open(f).convert("RGB"), np.uint8) for f in files]
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise PoseError(f"pose images in {path} differ in size: {sorted(shapes)[:3]}")
        return np.stack(frames)
    if not os.path.isfile(path):
        raise PoseError(f"pose video {path} does not exist")
    from svi_jax import video_io

    try:
        frames = video_io.read_mp4(path)
    except Exception as e:  # noqa: BLE001 - ffmpeg errors
        raise PoseError(f"cannot read pose video {path}: {e}") from None
    if len(frames) == 0:
        raise PoseError(f"pose video {path} has no frames")
    return frames


def frames_sha256(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


class PoseStream:
    """The pose condition of a long dance video: ``extra(k)`` -> ``{'pose': [1, T, H, W, 3] float32}``."""

    name = "pose"

    def __init__(self, frames_u8: np.ndarray, num_frames: int, height: int, width: int, motion_frames: int = 1,
                 source: str = ""):
        if frames_u8.ndim != 4 or frames_u8.shape[-1] != 3:
            raise PoseError(f"pose frames must be [N, H, W, 3], got {frames_u8.shape}")
        self.frames = resize_and_pad(np.asarray(frames_u8, np.uint8), height, width)
        self.T, self.m, self.source = int(num_frames), int(motion_frames), source
        self.sha256 = frames_sha256(self.frames)
        self._cache: tuple[int, list, list] = (0, [], [])

    @classmethod
    def from_path(cls, path: str, num_frames: int, height: int, width: int, motion_frames: int = 1):
        return cls(load_pose_frames(path), num_frames, height, width, motion_frames, source=os.path.abspath(path))

    def window(self, k: int) -> tuple[np.ndarray, int]:
        """Pose indices of clip ``k`` and the cursor after it."""
        if self._cache[0] <= k:
            self._cache = (2 * k + 2,) + pose_windows(len(self.frames), 2 * k + 2, self.T, self.m)
        return self._cache[1][k], self._cache[2][k]

    def extra(self, k: int) -> dict:
        return {"pose": self.frames[self.window(k)[0]][None].astype(np.float32)}

    def neg_extra(self, k: int) -> dict:
        return self.extra(k)              # cond_wo_pose=True: the pose stays in the unconditional pass

    def record(self, k: int) -> dict:
        idx, cursor = self.window(k)
        return {"pose_window": [int(idx[0]), int(idx[-1])], "pose_cursor": int(cursor)}

    def settings(self) -> dict:
        return {"pose_sha256": self.sha256, "pose_frames": int(len(self.frames))}


# ------------------------------------------------------------------------------------------------ weights


def merge_adapter(dit_params: dict, path: str, scale: float = 1.0) -> dict:
    """Base DiT params + a dance adapter (UniAnimate ``.ckpt``, SVI-Dance ``.safetensors`` or our adapter dir):
    the LoRA merged (``W += scale * B @ A``, the official ``load_lora_v2``) and the ``dwpose_embedding`` set."""
    from svi_jax import lora as lora_lib
    from svi_jax.convert.dance import load_adapter

    lora, pose, _ = load_adapter(path, dit_params)
    base = {k: v for k, v in dit_params.items() if k != "dwpose_embedding"}
    return {**lora_lib.merge(base, lora, scale), "dwpose_embedding": pose}


# ------------------------------------------------------------------------------------------------ CLI


def has_pose_module(dit_dir: str) -> bool:
    try:
        with open(os.path.join(dit_dir, "config.json")) as f:
            return bool(json.load(f).get("config", {}).get("pose_embedding", False))
    except (OSError, ValueError):
        return False


def cli_streams(config, pose=None, pose_dir=None, lora=None, motion_frames=None) -> tuple[list, dict]:
    """``([PoseStream], inputs)`` for a model with a pose embedding, ``([], {})`` otherwise (errors name the flag)."""
    if not config.model.get("pose_embedding", False):
        if pose or pose_dir:
            raise PoseError("--pose/--pose_dir need a model with a pose embedding (e.g. --config configs/dance.py)")
        return [], {}
    dit = config.checkpoints.get("dit", "")
    if dit and not lora and not has_pose_module(dit):
        raise PoseError(f"the DiT checkpoint {dit} has no pose module: give --lora with an SVI-Dance / UniAnimate "
                        f"adapter (svi-dance.safetensors, a .ckpt, an adapter dir or a training workdir)")
    src = [p for p in (pose, pose_dir) if p]
    if len(src) != 1:
        raise PoseError("this model has a pose embedding (SVI-Dance): give exactly one of --pose VIDEO or "
                        "--pose_dir DIR")
    d = config.data
    m = int(motion_frames or d.get("num_motion_frames", 1))
    stream = PoseStream.from_path(src[0], int(d.num_frames), int(d.height), int(d.width), m)
    return [stream], {"pose": os.path.abspath(src[0])}
