"""What the demo accepts from a browser, checked before anything is queued: each problem is one
:class:`InputError` whose message says what is wrong and what is allowed (shown as is on the page)."""
from __future__ import annotations

import dataclasses
import io
from typing import Optional

from svi_jax.prompts import PromptFileError, parse_prompts, schedule_prompts

# what PIL reads and browsers upload as photos or drawings; anything else (SVG, PDF, PSD, ...) is refused
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


class InputError(ValueError):
    """A request the demo refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 16
    max_prompt_chars: int = 2000
    max_prompt_stream_chars: int = 200_000
    max_clips: int = 100

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"image_formats": sorted(IMAGE_FORMATS)}


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def check_image(data: bytes, limits: Limits, name: str = "the image") -> str:
    """The file extension to store an uploaded reference image under, after checking its size, type and pixel
    dimensions (the header only; the pixels are decoded by :func:`svi_jax.images.load_rgb` when the job runs,
    and once here to catch truncated files)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("no reference image: choose an image file (PNG, JPEG, WebP, ...)")
    if len(data) > limits.max_image_bytes:
        raise InputError(f"{name} is {_mb(len(data))}, above the limit of {_mb(limits.max_image_bytes)}", 413)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, img.size
            if fmt not in IMAGE_FORMATS:
                raise InputError(f"{name} is a {fmt} image; accepted: {', '.join(sorted(IMAGE_FORMATS))}", 415)
            if w * h > limits.max_image_pixels:
                raise InputError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} MP, above the limit of "
                                 f"{limits.max_image_pixels / 1e6:.1f} MP: downscale it first", 413)
            if min(w, h) < limits.min_image_side:
                raise InputError(f"{name} is {w}x{h}: both sides must be at least {limits.min_image_side} px")
            img.load()
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image file (accepted: {', '.join(sorted(IMAGE_FORMATS))})", 415) \
            from None
    except Image.DecompressionBombError:
        raise InputError(f"{name} is above PIL's decompression-bomb limit: downscale it first", 413) from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{name} is damaged or truncated ({str(e).splitlines()[0][:120]})") from None
    return IMAGE_FORMATS[fmt]


def check_prompts(text: Optional[str], limits: Limits) -> list[str]:
    """The prompts of a prompt stream: one per line (blank lines and ``#`` lines skipped) or a Python-style list,
    as ``--prompts FILE`` reads it (:func:`svi_jax.prompts.parse_prompts`)."""
    text = (text or "").replace("\r\n", "\n")
    if len(text) > limits.max_prompt_stream_chars:
        raise InputError(f"the prompt stream is {len(text)} characters, above the limit of "
                         f"{limits.max_prompt_stream_chars}", 413)
    if not text.strip():
        raise InputError("no prompts: type one prompt per line (one line per clip)")
    try:
        prompts = parse_prompts(text, "the prompt stream")
    except PromptFileError as e:
        raise InputError(str(e)) from None
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            raise InputError(f"prompt {i + 1} is {len(p)} characters, above the limit of {limits.max_prompt_chars} "
                             f"({p[:40]!r}...)")
    if len(prompts) > limits.max_clips:
        raise InputError(f"{len(prompts)} prompts, above the limit of {limits.max_clips} clips")
    return prompts


def check_schedule(text: Optional[str], limits: Limits, defaults) -> Optional[tuple[str, list[str]]]:
    """A schedule pasted into the page (JSON Lines or YAML, as ``--schedule FILE``), validated as the CLI does
    (:mod:`svi_jax.schedule`; ``defaults``: the server's settings): ``(text, clip prompts)``, ``None`` when the
    field is blank."""
    from svi_jax import schedule

    text = (text or "").replace("\r\n", "\n")
    if not text.strip():
        return None
    if len(text) > limits.max_prompt_stream_chars:
        raise InputError(f"the schedule is {len(text)} characters, above the limit of "
                         f"{limits.max_prompt_stream_chars}", 413)
    try:
        plan = schedule.parse(text, defaults, "text", loras_refused=LORAS_REFUSED)
    except schedule.ScheduleError as e:
        raise InputError(str(e)) from None
    for c in plan.clips:
        if len(c.prompt) > limits.max_prompt_chars:
            raise InputError(f"the schedule's clip at line {c.line}: its prompt is {len(c.prompt)} characters, "
                             f"above the limit of {limits.max_prompt_chars}")
    if len(plan.clips) > limits.max_clips:
        raise InputError(f"{len(plan.clips)} clips in the schedule, above the limit of {limits.max_clips}")
    return text, plan.prompts


def schedule_clip_prompts(prompts: list[str], num_clips: int) -> list[str]:
    """The clip prompts of a checked schedule: its first ``num_clips`` records, or all of them for 0."""
    if num_clips > len(prompts):
        raise InputError(f"clips is {num_clips} but the schedule has {len(prompts)} clips")
    return list(prompts[:num_clips or len(prompts)])


def schedule_defaults(info: dict, seed: int):
    """What a pasted schedule's omitted fields inherit: the server's settings (``info``) and the form's seed."""
    from svi_jax import schedule

    return schedule.Defaults(prompt=None, seed=int(seed), seed_times=int(info.get("seed_times", 42)),
                             steps=int(info.get("num_steps", 50)), cfg_scale=float(info.get("cfg_scale", 5.0)),
                             solver=str(info.get("solver", "euler")), motion_frames=int(info.get("motion_frames", 1)))


LORAS_REFUSED = ("per-clip LoRAs are not available in the demo (a page may not name files on the server; the "
                 "server's --lora applies to every clip): use python -m svi_jax.sample --schedule")


def check_int(value, field: str, lo: int, hi: int, default: int) -> int:
    """An integer form field in ``[lo, hi]``; blank gives ``default``."""
    if value is None or str(value).strip() == "":
        return default
    try:
        n = int(str(value).strip())
    except ValueError:
        raise InputError(f"{field} must be a whole number, got {str(value)[:40]!r}") from None
    if not lo <= n <= hi:
        raise InputError(f"{field} must be in {lo}..{hi}, got {n}")
    return n


def clip_prompts(prompts: list[str], num_clips: int, limits: Limits) -> list[str]:
    """The prompt of every clip: one clip per prompt (``num_clips`` 0), or ``num_clips`` clips going round the
    prompts (as the CLI's ``--num_clips N --cycle_prompts``)."""
    if num_clips > limits.max_clips:
        raise InputError(f"clips must be at most {limits.max_clips}, got {num_clips}")
    return schedule_prompts(prompts, num_clips, cycle=True)
