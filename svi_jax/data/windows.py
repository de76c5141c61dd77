"""The official SVI clip sampling (train_svi.py, TextVideoDataset_onestage + training_step), as pure functions.

plan_clip() draws every random choice for one training clip from a numpy Generator; assemble() turns the
decoded window into the training example. Keeping the two apart lets the loader decode only the frames
and the crop the plan asks for (inside ffmpeg) and lets tests check the rules without any video.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    start: int  # first source frame
    stride: int
    num_real: int  # distinct source frames: start + k*stride for k < num_real
    num_frames: int  # window length T; positions num_real..T-1 repeat the last real frame
    crop: tuple  # (x, y, w, h) in source pixels
    num_cond: int  # condition frames at the start of `cond`
    pad_frame: int  # window position copied into the padding ('ref'); -1 for zero padding
    anchor: int = -1  # SVI 2.0 Pro (data.anchor='outside'): a source frame outside the window; -1: none

    def source_indices(self) -> np.ndarray:
        """Source frame index of each of the T window positions."""
        k = np.minimum(np.arange(self.num_frames), self.num_real - 1)
        return self.start + k * self.stride


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Inclusive, like Python's random.randint."""
    return int(rng.integers(lo, hi + 1))


def plan_window(total: int, num_frames: int, max_stride: int, rng: np.random.Generator):
    """(start, stride, num_real) as train_svi.py picks them.

    Long enough (total >= stride*T): start uniform in 0..max(0, total - stride*T - 5). Shorter: stride
    becomes max(total // T, 1), the window starts at 0 and its tail repeats the last frame. One deliberate
    difference: the official short-clip branch also drops the video's last frame (`total_frames - 1`,
    and it takes that branch when total == stride*T); here every decodable frame is usable.
    """
    if total < 1:
        raise ValueError("video has no frames")
    stride = _randint(rng, 1, max_stride)
    cover = stride * num_frames
    if total < cover:
        stride = max(total // num_frames, 1)
        end = min(stride * num_frames, total)
        num_real = len(range(0, end, stride))
        return 0, stride, min(num_real, num_frames)
    max_start = max(0, total - cover - 5)
    start = _randint(rng, 0, max_start) if max_start > 0 else 0
    return start, stride, num_frames


def plan_crop(src_h: int, src_w: int, height: int, width: int, rng: np.random.Generator):
    """Random crop with the target aspect, the limiting side shrunk by up to 1/14 (x, y, w, h)."""
    aspect = height / width
    if src_w * aspect <= src_h:
        crop_w = _randint(rng, src_w - src_w // 14, src_w)
        crop_h = int(crop_w * aspect)
    else:
        crop_h = _randint(rng, src_h - src_h // 14, src_h)
        crop_w = int(crop_h / aspect)
    crop_w = max(1, min(crop_w, src_w))
    crop_h = max(1, min(crop_h, src_h))
    x = _randint(rng, 0, src_w - crop_w) if src_w > crop_w else 0
    y = _randint(rng, 0, src_h - crop_h) if src_h > crop_h else 0
    return x, y, crop_w, crop_h


def plan_clip(total: int, src_h: int, src_w: int, cfg, rng: np.random.Generator) -> ClipPlan:
    """All random choices for one clip: window, crop, padding frame, number of condition frames."""
    start, stride, num_real = plan_window(total, cfg.num_frames, cfg.frame_stride, rng)
    crop = plan_crop(src_h, src_w, cfg.height, cfg.width, rng)
    pad = _randint(rng, 0, cfg.num_frames - 1)  # drawn in both modes so 'zero' and 'ref' share the rest
    num_cond = 1
    if cfg.num_motion_frames > 1 and rng.random() < cfg.p_motion:
        num_cond = cfg.num_motion_frames
    ref = cfg.pad_mode == "ref" or (cfg.pad_mode == "mix" and rng.random() < 0.5)  # 'mix': a coin per clip
    anchor = -1
    if cfg.get("anchor", "") == "outside":      # drawn last: every other choice is as without it
        anchor = outside_frame(total, start, stride, num_real, rng)
    return ClipPlan(start=start, stride=stride, num_real=num_real, num_frames=cfg.num_frames, crop=crop,
                    num_cond=num_cond, pad_frame=pad if ref else -1, anchor=anchor)


def outside_frame(total: int, start: int, stride: int, num_real: int, rng: np.random.Generator) -> int:
    """A source frame uniformly drawn from outside the window's span ``[start, start + stride (num_real - 1)]``
    (SVI 2.0 Pro's anchor); a video with no frame outside it gives one of the window's own frames."""
    last = start + stride * (num_real - 1)
    outside = start + max(0, total - 1 - last)
    if outside == 0:
        return start + stride * _randint(rng, 0, num_real - 1)
    r = _randint(rng, 0, outside - 1)
    return r if r < start else last + 1 + (r - start)


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (one pass, no temporaries)."""
    out = np.empty(frames.shape, np.float32)
    np.multiply(frames, np.float32(1.0 / 127.5), out=out, casting="unsafe")
    out -= 1.0
    np.clip(out, -1.0, 1.0, out=out)
    return out


def pose_window(window: np.ndarray, plan: ClipPlan) -> np.ndarray:
    """The skeleton frames of a clip, float32 0..255 ``[T, H, W, 3]`` (tail repeating the last, as the video;
    the official ``dwpose_data`` goes to the model as pixels / 255)."""
    t = plan.num_frames
    if window.shape[0] == 0:
        raise ValueError("the pose video decoded to no frames for this window")
    if window.shape[0] < t:
        window = np.concatenate([window, np.repeat(window[-1:], t - window.shape[0], axis=0)], axis=0)
    return window[:t].astype(np.float32)


def assemble(window: np.ndarray, plan: ClipPlan, caption: str) -> dict:
    """Training example from the decoded window uint8 [num_real (or more), H, W, 3].

    video [T,H,W,3], cond [T,H,W,3] (num_cond real frames, then the padding frame or zeros),
    first_frame [H,W,3] (CLIP's input), num_cond, caption. Floats in [-1, 1].
    """
    t = plan.num_frames
    if window.shape[0] < t:  # official: the tail repeats the last real frame
        tail = np.repeat(window[-1:], t - window.shape[0], axis=0)
        window = np.concatenate([window, tail], axis=0)
    video = to_float(window[:t])
    n = plan.num_cond
    cond = np.empty_like(video)
    cond[:n] = video[:n]
    if plan.pad_frame >= 0:
        cond[n:] = video[plan.pad_frame]
    else:
        cond[n:] = 0.0
    return {"video": video, "cond": cond, "first_frame": video[0].copy(),
            "num_cond": np.int32(n), "caption": caption}
