"""Synthetic videos from the images bundled with scikit-image: a smooth camera path over a still image
plus a moving sprite cut from another image, deterministic from a seed.

make_sequence() returns ground-truth frames of any length (the first T frames do not depend on how many
are asked for, so a dataset clip is the prefix of the long sequence used for drift evaluation);
write_dataset() writes a folder in the official SVI layout (category = camera motion).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import zlib
from typing import Optional, Sequence

import numpy as np

MOTIONS = ("pan", "zoom", "rotate", "orbit")

# name -> (skimage.data function, caption phrase)
BACKGROUNDS = {
    "astronaut": ("astronaut", "a portrait of an astronaut in an orange suit"),
    "chelsea": ("chelsea", "a tabby cat's face"),
    "coffee": ("coffee", "a cup of coffee on a table"),
    "rocket": ("rocket", "a rocket on its launch pad"),
    "retina": ("retina", "a retina scan with red blood vessels"),
    "hubble_deep_field": ("hubble_deep_field", "a deep field of distant galaxies"),
    "immunohistochemistry": ("immunohistochemistry", "a stained tissue sample under a microscope"),
    "colorwheel": ("colorwheel", "a colour wheel"),
    "camera": ("camera", "a black and white photo of a cameraman"),
    "brick": ("brick", "a grey brick wall"),
}

# name -> (image, (top, bottom, left, right) in the source image or None, caption phrase)
SPRITES = {
    "logo": ("logo", None, "the scikit-image logo"),
    "astronaut_face": ("astronaut", (10, 200, 140, 310), "an astronaut's face"),
    "cat_head": ("chelsea", (10, 290, 40, 400), "a cat's head"),
    "shuttle": ("astronaut", (0, 285, 345, 470), "a toy space shuttle"),
    "helmet": ("astronaut", (340, 512, 275, 512), "a black helmet"),
    "coffee_cup": ("coffee", (30, 400, 190, 520), "a coffee cup"),
    "gif": ("gif", None, "a small animated figure"),
}

_MOTION_WORDS = {"pan": "slowly panning", "zoom": "slowly zooming", "rotate": "gently rotating",
                 "orbit": "drifting, zooming and rotating"}


def _skimage_image(name: str) -> np.ndarray:
    import skimage.data

    if name == "gif":
        return _gif_frames()[0]
    img = getattr(skimage.data, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    return img


@functools.lru_cache(maxsize=None)
def _gif_frames() -> np.ndarray:
    import imageio.v3 as iio
    import skimage

    path = os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")
    frames = np.asarray(iio.imread(path, index=None))
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, -1)
    return frames[..., :3]


def load_image(name: str) -> np.ndarray:
    """A background image as uint8 [H, W, 3]."""
    if name not in BACKGROUNDS:
        raise KeyError(f"unknown image {name!r}; choose from {sorted(BACKGROUNDS)}")
    img = _skimage_image(BACKGROUNDS[name][0])
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    return np.ascontiguousarray(img[..., :3])


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Antialiased resize of float [H, W, C] with PIL (per channel, float32 mode)."""
    from PIL import Image

    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                        .resize((w, h), Image.LANCZOS if (h < img.shape[0]) else Image.BICUBIC))
             for c in range(img.shape[-1])]
    return np.stack(chans, -1)


@functools.lru_cache(maxsize=32)
def _background(name: str, long_side: int) -> np.ndarray:
    img = load_image(name).astype(np.float32)
    s = long_side / max(img.shape[:2])
    return _resize(img, max(2, round(img.shape[0] * s)), max(2, round(img.shape[1] * s)))


def _ellipse_alpha(h: int, w: int, soft: float = 0.08) -> np.ndarray:
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    r = np.sqrt(yy ** 2 + xx ** 2)
    return np.clip((1.0 - r) / soft, 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _sprite_frames(name: str, size: int) -> np.ndarray:
    """RGBA float32 [F, size, size, 4] (F > 1 only for the animated GIF), 1-pixel transparent border."""
    src, box, _ = SPRITES[name]
    if name == "gif":
        frames = _gif_frames().astype(np.float32)
        alpha = np.ones(frames.shape[:3] + (1,), np.float32)
        rgba = np.concatenate([frames, alpha], -1)
    else:
        img = _skimage_image(src)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        if box is not None:
            t, b, l, r = box
            img = img[t:b, l:r]
        img = img.astype(np.float32)
        if img.shape[-1] == 4:
            rgba = img.copy()
            rgba[..., 3] /= 255.0
        else:
            rgba = np.concatenate([img[..., :3], _ellipse_alpha(*img.shape[:2])[..., None]], -1)
        rgba = rgba[None]
    h, w = rgba.shape[1:3]
    s = (size - 2) / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.zeros((rgba.shape[0], size, size, 4), np.float32)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    for i, fr in enumerate(rgba):
        # premultiply before resizing so transparent pixels do not bleed colour
        pm = np.concatenate([fr[..., :3] * fr[..., 3:], fr[..., 3:]], -1)
        out[i, y0:y0 + nh, x0:x0 + nw] = _resize(pm, nh, nw)
    out[..., 3] = np.clip(out[..., 3], 0.0, 1.0)
    return out


def _bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample float32 [H, W, C] at float pixel coordinates (clamped to the border)."""
    h, w, ch = img.shape
    y = np.clip(y, 0.0, h - 1.0)
    x = np.clip(x, 0.0, w - 1.0)
    y0 = np.minimum(y.astype(np.int32), max(h - 2, 0))
    x0 = np.minimum(x.astype(np.int32), max(w - 2, 0))
    wy = (y - y0).astype(np.float32)[..., None]
    wx = (x - x0).astype(np.float32)[..., None]
    flat = img.reshape(-1, ch)
    i00 = y0 * w + x0
    dy = w if h > 1 else 0
    dx = 1 if w > 1 else 0
    top = flat[i00] * (1 - wx) + flat[i00 + dx] * wx
    bot = flat[i00 + dy] * (1 - wx) + flat[i00 + dy + dx] * wx
    return top * (1 - wy) + bot * wy


@dataclasses.dataclass(frozen=True)
class Motion:
    """Smooth per-frame camera + sprite parameters; sums of slow sinusoids (bounded for any length)."""

    cam: np.ndarray  # [4, K, 3]: (center_x, center_y, log_zoom, angle) x K terms x (amp, freq, phase)
    sprite: np.ndarray  # [4, K, 3]: (x, y, log_scale, angle)
    sprite_base: np.ndarray  # [4]

    def _eval(self, table, t):
        amp, freq, ph = table[..., 0:1], table[..., 1:2], table[..., 2:3]
        return np.sum(amp * np.sin(2 * np.pi * freq * t[None, None] + ph), axis=1)  # [4, T]

    def camera(self, t):
        return self._eval(self.cam, t)

    def object(self, t):
        return self.sprite_base[:, None] + self._eval(self.sprite, t)


def make_motion(kind: str, seed: int, speed: float = 1.0) -> Motion:
    if kind not in MOTIONS:
        raise KeyError(f"unknown motion {kind!r}; choose from {MOTIONS}")
    rng = np.random.default_rng([seed, zlib.crc32(kind.encode())])
    k = 2

    def terms(amp, n=k):
        # periods 40..160 frames (at speed 1): smooth at 16 fps, visible within a 33-frame clip
        a = rng.uniform(0.5, 1.0, n) * amp / n
        f = speed / rng.uniform(40.0, 160.0, n)
        p = rng.uniform(0, 2 * np.pi, n)
        return np.stack([a, f, p], -1)

    pan = 0.22 if kind in ("pan", "orbit") else 0.04
    zoom = 0.25 if kind in ("zoom", "orbit") else 0.0
    rot = np.deg2rad(14.0) if kind in ("rotate", "orbit") else 0.0
    cam = np.stack([terms(pan), terms(pan), terms(zoom), terms(rot)])
    spr = np.stack([terms(0.28), terms(0.28), terms(0.15), terms(np.deg2rad(20.0))])
    base = np.array([0.0, 0.0, 0.0, rng.uniform(-0.2, 0.2)])
    return Motion(cam=cam, sprite=spr, sprite_base=base)


def _pick(name_or_none, options: Sequence[str], seed: int, salt: str, exclude: Optional[str] = None) -> str:
    if name_or_none is not None:
        return name_or_none
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    opts = [o for o in options if SPRITES.get(o, ("",))[0] != exclude]
    return opts[int(rng.integers(len(opts)))]


def make_sequence(image_name: str, num_frames: int, height: int, width: int, seed: int = 0, *,
                  motion: str = "orbit", sprite: Optional[str] = "auto", speed: float = 1.0,
                  start: int = 0) -> np.ndarray:
    """Ground-truth frames uint8 [T, H, W, 3]: camera path over `image_name` + a moving sprite.

    sprite: a SPRITES name, 'auto' (seeded choice from another image) or None. Frame t depends only on
    (image, motion, sprite, seed, speed, t), so sequences of different lengths share their prefix and
    `start` gives frames start..start+T-1 of the same sequence.
    """
    if sprite == "auto":
        sprite = _pick(None, sorted(SPRITES), seed, "sprite:" + image_name, exclude=BACKGROUNDS[image_name][0])
    if sprite is not None and sprite not in SPRITES:
        raise KeyError(f"unknown sprite {sprite!r}; choose from {sorted(SPRITES)}")
    mot = make_motion(motion, seed, speed)
    t = np.arange(start, start + num_frames, dtype=np.float64)
    cx, cy, lz, ang = mot.camera(t)

    # view: a window of fraction VIEW of the image's short side, at ~1.6 source px per output px
    view = 0.5
    long_out = max(height, width)
    src = load_image(image_name)
    short_frac = min(src.shape[:2]) / max(src.shape[:2])
    bg = _background(image_name, int(np.ceil(1.6 * long_out / (view * short_frac))))
    bh, bw = bg.shape[:2]
    vw = view * min(bh, bw)  # view width in background pixels at zoom 1
    vh = vw * height / width
    yy, xx = np.meshgrid((np.arange(height, dtype=np.float32) + 0.5) / height - 0.5,
                         (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5, indexing="ij")
    out = np.empty((num_frames, height, width, 3), np.uint8)
    if sprite is not None:
        sp_size = int(max(8, round(0.45 * min(height, width) * 1.5)))
        sp = _sprite_frames(sprite, sp_size)
        ox, oy, ls, oang = mot.object(t)
    for i in range(num_frames):
        z = np.float32(np.exp(lz[i]))
        c, s = np.float32(np.cos(ang[i])), np.float32(np.sin(ang[i]))
        u, v = xx * vw / z, yy * vh / z
        px = np.float32(bw * (0.5 + cx[i]) - 0.5) + (c * u - s * v)
        py = np.float32(bh * (0.5 + cy[i]) - 0.5) + (s * u + c * v)
        frame = _bilinear(bg, py, px)
        if sprite is not None:
            # sprite centre in output pixels, size ~0.45 of the short side
            scx, scy = np.float32(width * (0.5 + ox[i])), np.float32(height * (0.5 + oy[i]))
            size_px = np.float32(0.45 * min(height, width) * np.exp(ls[i]))
            c2, s2 = np.float32(np.cos(-oang[i])), np.float32(np.sin(-oang[i]))
            r = float(size_px) * 0.75 + 2  # the sprite square's half-diagonal, plus a margin
            y_lo, y_hi = max(0, int(scy - r)), min(height, int(np.ceil(scy + r)))
            x_lo, x_hi = max(0, int(scx - r)), min(width, int(np.ceil(scx + r)))
            if y_hi > y_lo and x_hi > x_lo:
                win = (slice(y_lo, y_hi), slice(x_lo, x_hi))
                dx, dy = (xx[win] + 0.5) * width - scx, (yy[win] + 0.5) * height - scy
                scale = np.float32(sp_size) / size_px
                lx = (c2 * dx - s2 * dy) * scale + np.float32(sp_size / 2 - 0.5)
                ly = (s2 * dx + c2 * dy) * scale + np.float32(sp_size / 2 - 0.5)
                fr = sp[(start + i) // 2 % sp.shape[0]]  # animated sprites advance every 2nd frame
                rgba = _bilinear(fr, ly, lx)
                a = rgba[..., 3:]
                frame[win] = frame[win] * (1 - a) + rgba[..., :3]
        out[i] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def caption_for(image_name: str, motion: str, sprite: Optional[str]) -> str:
    text = f"A {_MOTION_WORDS[motion]} shot of {BACKGROUNDS[image_name][1]}"
    if sprite is not None:
        text += f", while {SPRITES[sprite][2]} moves across the frame"
    return text + "."


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    file: str  # relative to the dataset folder
    image: str
    motion: str
    sprite: Optional[str]
    seed: int
    caption: str


def dataset_specs(num_videos: int, seed: int = 0, motions: Sequence[str] = MOTIONS,
                  images: Optional[Sequence[str]] = None) -> list:
    images = list(images or BACKGROUNDS)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(images))
    specs = []
    for i in range(num_videos):
        image = images[order[i % len(images)]]
        motion = motions[i % len(motions)]
        clip_seed = int(np.random.default_rng([seed, i]).integers(2 ** 31))
        sprite = _pick(None, sorted(SPRITES), clip_seed, "sprite:" + image, exclude=BACKGROUNDS[image][0])
        specs.append(ClipSpec(file=f"{motion}/{motion}_{i:04d}_{image}.mp4", image=image, motion=motion,
                              sprite=sprite, seed=clip_seed, caption=caption_for(image, motion, sprite)))
    return specs


def write_dataset(out: str, num_videos: int = 16, num_frames: int = 33, height: int = 64, width: int = 64,
                  fps: float = 16.0, seed: int = 0, motions: Sequence[str] = MOTIONS,
                  images: Optional[Sequence[str]] = None, crf: int = 12, progress: bool = False) -> list:
    """Write `num_videos` mp4 clips in the official layout (out/<motion>/<motion>.csv + videos).

    Also writes out/synthetic.json with every clip's parameters (make_sequence(**params) regenerates
    its ground truth at any length). Returns the ClipSpecs.
    """
    from tqdm import tqdm

    from svi_jax.data.video import write_video

    if height % 2 or width % 2:
        raise ValueError(f"height/width must be even for yuv420p mp4, got {height}x{width}")
    specs = dataset_specs(num_videos, seed, motions, images)
    rows = {}
    for spec in tqdm(specs, desc="synthetic videos", disable=not progress):
        frames = make_sequence(spec.image, num_frames, height, width, spec.seed, motion=spec.motion,
                               sprite=spec.sprite)
        path = os.path.join(out, spec.file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_video(path, frames, fps=fps, crf=crf)
        rows.setdefault(spec.motion, []).append((os.path.basename(spec.file), spec.caption))
    write_index(out, rows, "synthetic.json", {"num_frames": num_frames, "height": height, "width": width, "fps": fps,
                                              "seed": seed}, specs)
    return specs


def write_index(out: str, rows: dict, name: str, meta: dict, specs) -> None:
    """The official layout's ``<category>/<category>.csv`` (``Filename, Video Description``) for ``rows`` =
    {category: [(file, caption)]}, and ``out/name`` with ``meta`` and every clip's parameters."""
    for category, items in rows.items():
        with open(os.path.join(out, category, f"{category}.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Filename", "Video Description"])
            w.writerows(items)
    with open(os.path.join(out, name), "w") as f:
        json.dump({**meta, "clips": [dataclasses.asdict(s) for s in specs]}, f, indent=1)
