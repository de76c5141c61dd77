"""Synthetic clips whose future is fully determined by what the model sees: a picture scrolling on a torus.

Frame ``t`` of a clip is the first frame cyclically shifted by ``t * speed`` pixels in the captioned direction
(``np.roll``; integer pixels, so no interpolation blur). Content that leaves one edge re-enters at the opposite
one, so nothing unseen ever comes into view: given the first frame and the caption ("pans left at 2 px per
frame") -- or, for Film chaining, the motion frames -- every later frame is known exactly, at any length. PSNR/SSIM
against :func:`make_scroll` then measure drift and nothing else (a camera path over a larger picture would bring
in content the model cannot know, and a zoom grows without bound or reveals unseen borders).

Pictures: scikit-image's bundled samples (no download), split into training and held-out pictures; training
clips use random crops at random scales of the training pictures, so the model sees many distinct "pictures" and
must learn the motion, not the pictures. :func:`write_dataset` writes the official SVI folder layout
(``<category>/<category>.csv`` with ``Filename, Video Description``; category = direction) plus ``scroll.json``
with every clip's parameters.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

# direction -> (dy, dx) of the *content* per unit speed; the camera pans the opposite way
DIRECTIONS = {
    "left": (0, 1), "right": (0, -1), "up": (1, 0), "down": (-1, 0),
    "up-left": (1, 1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (-1, -1),
}
SPEEDS = (1, 2)

# name -> caption phrase. Training pictures get random crops; held-out pictures are never used in training.
PICTURES = {
    "astronaut": "an astronaut in an orange suit", "cat": "a cat in close-up", "chelsea": "a tabby cat's face",
    "coffee": "a cup of coffee", "colorwheel": "a colour wheel", "hubble_deep_field": "distant galaxies",
    "immunohistochemistry": "a stained tissue sample", "logo": "the scikit-image logo", "retina": "a retina scan",
    "clock": "a wall clock", "coins": "old coins", "grass": "grass", "gravel": "gravel", "moon": "the moon's surface",
    "page": "a printed page", "text": "hand-written text", "cell": "a cell under a microscope",
    "camera": "a cameraman", "brick": "a brick wall", "rocket": "a rocket on its launch pad",
    "stereo_motorcycle": "a motorcycle",
}
TRAIN_PICTURES = ("astronaut", "cat", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry",
                  "logo", "retina", "clock", "coins", "grass", "gravel", "moon", "page", "text", "cell")
HELDOUT_PICTURES = ("camera", "brick", "rocket", "stereo_motorcycle")


def caption(direction: str, speed: int) -> str:
    """The motion, and only the motion: "The view pans up-left at 2 px per frame."

    The picture is not named. A base that saw "... over a cup of coffee." learnt in 6,000 steps to ignore the
    caption altogether (docs/drift.md, the caption probe): the picture phrase varies more than the motion words and
    says nothing about the future frames, so the one thing the caption must carry was the smaller part of it."""
    if direction not in DIRECTIONS:
        raise KeyError(f"unknown direction {direction!r}; choose from {sorted(DIRECTIONS)}")
    return f"The view pans {direction} at {speed} px per frame."


def load_picture(name: str) -> np.ndarray:
    """A scikit-image sample picture as float32 RGB [H, W, 3] in 0..255."""
    import skimage.data

    if name not in PICTURES:
        raise KeyError(f"unknown picture {name!r}; choose from {sorted(PICTURES)}")
    img = getattr(skimage.data, name)()
    img = np.asarray(img[0] if isinstance(img, tuple) else img)  # stereo_motorcycle: (left, right, disparity)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.shape[-1] == 4:  # RGBA over white
        a = img[..., 3:].astype(np.float32) / 255.0
        img = img[..., :3] * a + 255.0 * (1 - a)
    return np.asarray(img[..., :3], np.float32)


def first_frame(picture: str, height: int, width: int, *, crop: float = 1.0, cy: float = 0.5,
                cx: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: a window of ``crop`` x the largest window of the frame's aspect, centred at (cy, cx), resized
    with antialiasing (PIL Lanczos)."""
    from PIL import Image

    img = load_picture(picture)
    ih, iw = img.shape[:2]
    scale = min(ih / height, iw / width) * float(crop)
    wh, ww = height * scale, width * scale
    y0 = float(np.clip(cy * ih - wh / 2, 0, ih - wh))
    x0 = float(np.clip(cx * iw - ww / 2, 0, iw - ww))
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    out = pil.resize((width, height), Image.LANCZOS, box=(x0, y0, x0 + ww, y0 + wh))
    return np.asarray(out, np.uint8)


def make_scroll(frame0: np.ndarray, num_frames: int, direction: str, speed: int, start: int = 0) -> np.ndarray:
    """Frames ``start .. start + num_frames - 1`` (uint8 [T, H, W, 3]) of ``frame0`` scrolling on a torus."""
    if direction not in DIRECTIONS:
        raise KeyError(f"unknown direction {direction!r}; choose from {sorted(DIRECTIONS)}")
    dy, dx = DIRECTIONS[direction]
    return np.stack([np.roll(frame0, ((start + t) * speed * dy, (start + t) * speed * dx), axis=(0, 1))
                     for t in range(num_frames)])


@dataclasses.dataclass(frozen=True)
class ScrollSpec:
    file: str          # relative to the dataset folder
    picture: str
    direction: str
    speed: int
    crop: float
    cy: float
    cx: float
    caption: str

    def frame0(self, height: int, width: int) -> np.ndarray:
        return first_frame(self.picture, height, width, crop=self.crop, cy=self.cy, cx=self.cx)


def dataset_specs(num_videos: int, seed: int = 0, pictures: Sequence[str] = TRAIN_PICTURES) -> list:
    """Deterministic clip parameters: every direction x speed in turn, random picture, crop and position."""
    rng = np.random.default_rng([seed, 18])
    motions = [(d, s) for d in DIRECTIONS for s in SPEEDS]
    specs = []
    for i in range(num_videos):
        direction, speed = motions[i % len(motions)]
        pic = pictures[int(rng.integers(len(pictures)))]
        crop, cy, cx = float(rng.uniform(0.3, 1.0)), float(rng.uniform(0, 1)), float(rng.uniform(0, 1))
        specs.append(ScrollSpec(file=f"{direction}/{direction}_{i:04d}_{pic}.mp4", picture=pic, direction=direction,
                                speed=speed, crop=round(crop, 4), cy=round(cy, 4), cx=round(cx, 4),
                                caption=caption(direction, speed)))
    return specs


def heldout_specs(pictures: Sequence[str] = HELDOUT_PICTURES) -> list:
    """One start per held-out picture (the whole picture, centred), each with its own direction and speed."""
    motions = [("left", 1), ("up", 2), ("down-right", 1), ("right", 2), ("up-left", 2), ("down", 1)]
    return [ScrollSpec(file="", picture=p, direction=motions[i % len(motions)][0],
                       speed=motions[i % len(motions)][1], crop=1.0, cy=0.5, cx=0.5,
                       caption=caption(*motions[i % len(motions)])) for i, p in enumerate(pictures)]


def write_dataset(out: str, num_videos: int, num_frames: int, height: int, width: int, fps: float = 16.0,
                  seed: int = 0, pictures: Optional[Sequence[str]] = None, crf: int = 0,
                  progress: bool = False) -> list:
    """Write ``num_videos`` scrolling clips in the official layout; returns their :class:`ScrollSpec`."""
    from tqdm import tqdm

    from svi_jax.data.synthetic import write_index
    from svi_jax.data.video import write_video

    if height % 2 or width % 2:
        raise ValueError(f"height/width must be even for yuv420p mp4, got {height}x{width}")
    specs = dataset_specs(num_videos, seed, tuple(pictures or TRAIN_PICTURES))
    rows = {}
    for spec in tqdm(specs, desc="scrolling clips", disable=not progress):
        frames = make_scroll(spec.frame0(height, width), num_frames, spec.direction, spec.speed)
        path = os.path.join(out, spec.file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_video(path, frames, fps=fps, crf=crf, pix_fmt="yuv444p")
        rows.setdefault(spec.direction, []).append((os.path.basename(spec.file), spec.caption))
    write_index(out, rows, "scroll.json", {"num_frames": num_frames, "height": height, "width": width, "fps": fps,
                                           "seed": seed}, specs)
    return specs
