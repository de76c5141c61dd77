"""The output size of a generation, as the official ``test_svi.py``: the reference image keeps its aspect ratio.

Official rule (``utils/image_process.py`` ``calculate_dimensions``, called by ``test_svi.py`` with
``max_width=args.max_width``, default 832; ``test_svi_talk.py`` / ``test_svi_dance.py`` use 640)::

    if W0 <= max_width: width, height = W0, H0
    else:               width, height = max_width, int(max_width * (H0 / W0))
    width, height = width // 16 * 16, height // 16 * 16

``W0 x H0`` is the reference *as displayed*: the EXIF orientation is applied first (the official script measures
``Image.open(path).size``, which ignores it, while ``cv2.imread`` rotates the pixels -- so it stretches a rotated
phone picture to the unrotated shape; we measure what we feed). The multiple is the model's pixel granularity, VAE
stride x DiT patch: 8 x 2 = 16 for Wan (the official 16), smaller for the tiny test models.

Precedence: ``--height`` and ``--width`` (both), else ``config.sample.height/width`` (both > 0), else the rule above
with ``--max_width``, else ``config.sample.max_width``, else ``config.data.width`` (832 for Shot/Film, 640 for Talk;
Dance sets 640).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

OFFICIAL_MAX_WIDTH = 832


def official_dimensions(w0: int, h0: int, max_width: int = OFFICIAL_MAX_WIDTH, multiple: int = 16) -> tuple[int, int]:
    """``(height, width)`` of a ``w0 x h0`` reference by the official rule (see the module doc)."""
    if w0 <= max_width:
        width, height = w0, h0
    else:
        width = max_width
        height = int(width * (h0 / w0))
    return height // multiple * multiple, width // multiple * multiple


def size_multiple(config) -> int:
    """VAE stride x DiT patch: the granularity of sizes the model accepts (16 for Wan)."""
    spec = config.encoders.vae.to_dict() if "encoders" in config else {}
    spatial = int(spec.get("spatial", 2)) if spec.get("kind", "wan") == "patch" else 8
    patch = list(config.model.get("patch_size", (1, 2, 2)))
    return spatial * max(int(patch[1]), int(patch[2]))


@dataclasses.dataclass
class Size:
    height: int
    width: int
    source: str                      # "flags" | "config" | "image"
    reference: tuple[int, int]       # the reference's (width, height), EXIF orientation applied
    max_width: Optional[int] = None
    multiple: int = 16

    def describe(self) -> str:
        w0, h0 = self.reference
        how = {"flags": "from --height/--width", "config": "from config.sample.height/width",
               "image": f"from the reference's aspect ratio, max width {self.max_width}, multiples of {self.multiple}"}
        return f"output size {self.width}x{self.height} ({how[self.source]}; reference {w0}x{h0})"

    def record(self) -> dict:
        return {"height": self.height, "width": self.width, "source": self.source,
                "reference_width": self.reference[0], "reference_height": self.reference[1],
                "max_width": self.max_width, "multiple": self.multiple}


def _explicit(height, width, what: str, multiple: int) -> Optional[tuple[int, int]]:
    given = [v for v in (height, width) if v]
    if not given:
        return None
    if len(given) == 1:
        raise ValueError(f"give both {what} height and width (or neither: the size then follows the reference)")
    for name, v in (("height", height), ("width", width)):
        if int(v) <= 0 or int(v) % multiple:
            raise ValueError(f"{what} {name} {v} must be a positive multiple of {multiple} (VAE stride x DiT patch "
                             f"of this model)")
    return int(height), int(width)


def choose(config, image_path: str, height: Optional[int] = None, width: Optional[int] = None,
           max_width: Optional[int] = None) -> Size:
    """The output size for ``image_path`` (see the module doc for the precedence)."""
    from svi_jax.images import reference_size

    multiple = size_multiple(config)
    ref = reference_size(image_path)
    hw = _explicit(height, width, "--height/--width:", multiple)
    if hw is not None:
        return Size(hw[0], hw[1], "flags", ref, multiple=multiple)
    sample = config.get("sample", {}) or {}
    hw = _explicit(sample.get("height", 0), sample.get("width", 0), "config.sample", multiple)
    if hw is not None:
        return Size(hw[0], hw[1], "config", ref, multiple=multiple)
    mw = int(max_width or sample.get("max_width", 0) or config.data.width)
    if mw < multiple:
        raise ValueError(f"--max_width {mw} is below the size multiple {multiple}")
    h, w = official_dimensions(ref[0], ref[1], mw, multiple)
    if h < multiple or w < multiple:
        raise ValueError(f"reference {image_path} is {ref[0]}x{ref[1]}: at max width {mw} its size floors to {w}x{h}; "
                         f"give --height/--width or a larger image")
    return Size(h, w, "image", ref, mw, multiple)
