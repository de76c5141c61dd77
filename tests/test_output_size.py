"""Output size as the official test_svi.py (utils/image_process.py calculate_dimensions), EXIF orientation applied."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from svi_jax import output_size as O
from svi_jax.images import reference_size


def official_calculate_dimensions(img, max_width=640):
    """Transcribed from vita-epfl/Stable-Video-Infinity utils/image_process.py lines 39-70 (calculate_dimensions);
    test_svi.py line 369 calls it with max_width=args.max_width (default 832, line 169-172)."""
    original_width, original_height = img.size
    if original_width <= max_width:
        width = original_width
        height = original_height
    else:
        aspect_ratio = original_height / original_width
        width = max_width
        height = int(width * aspect_ratio)
    width = (width // 16) * 16
    height = (height // 16) * 16
    return height, width


def _cfg(width=832, sample=None):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(patch_size=(1, 2, 2)))
    c.encoders = ml_collections.ConfigDict(dict(vae=ml_collections.ConfigDict()))
    c.data = ml_collections.ConfigDict(dict(height=480, width=width))
    c.sample = ml_collections.ConfigDict(sample or dict(height=0, width=0, max_width=0))
    return c


def test_rule_matches_the_official_on_many_shapes():
    rng = np.random.default_rng(0)
    shapes = [(832, 480), (833, 480), (1920, 1080), (1080, 1920), (640, 640), (17, 17), (3000, 7), (831, 2000),
              (1664, 961)] + [tuple(int(v) for v in rng.integers(16, 4000, 2)) for _ in range(300)]
    for w0, h0 in shapes:
        img = Image.new("RGB", (w0, h0))
        for mw in (832, 640):
            assert O.official_dimensions(w0, h0, mw) == official_calculate_dimensions(img, mw), (w0, h0, mw)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 5])
def test_exif_rotated_jpegs(tmp_path, orientation):
    raw = Image.fromarray(np.random.default_rng(1).integers(0, 255, (600, 1000, 3), np.uint8))  # 1000 x 600 stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / "r.jpg")
    raw.save(path, exif=exif)
    shown = ImageOps.exif_transpose(Image.open(path))
    assert reference_size(path) == shown.size
    s = O.choose(_cfg(), path)
    assert (s.height, s.width) == official_calculate_dimensions(shown, 832)
    if orientation in (5, 6, 8):
        assert (s.height, s.width) == (992, 592)          # portrait: 600 x 1000 as displayed
    else:
        assert (s.height, s.width) == (496, 832)
    assert s.source == "image" and s.record()["reference_width"] == shown.size[0]


def test_precedence_and_errors(tmp_path):
    path = str(tmp_path / "a.png")
    Image.new("RGB", (1000, 500)).save(path)
    assert (O.choose(_cfg(), path).height, O.choose(_cfg(), path).width) == (416, 832)
    s = O.choose(_cfg(), path, 480, 832)
    assert (s.height, s.width, s.source) == (480, 832, "flags")
    s = O.choose(_cfg(sample=dict(height=320, width=640, max_width=0)), path)
    assert (s.height, s.width, s.source) == (320, 640, "config")
    assert O.choose(_cfg(), path, max_width=640).width == 640                     # --max_width
    assert O.choose(_cfg(sample=dict(height=0, width=0, max_width=640)), path).width == 640
    assert O.choose(_cfg(width=640), path).width == 640                           # config.data.width
    with pytest.raises(ValueError, match="both"):
        O.choose(_cfg(), path, 480, None)
    with pytest.raises(ValueError, match="multiple of 16"):
        O.choose(_cfg(), path, 480, 830)
    Image.new("RGB", (40, 8)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="floors to"):
        O.choose(_cfg(), str(tmp_path / "tiny.png"))
    tiny = _cfg(width=48)
    tiny.encoders.vae = ml_collections.ConfigDict(dict(kind="patch", spatial=2))
    s = O.choose(tiny, str(tmp_path / "tiny.png"))                               # granularity 4 for this model
    assert (s.height, s.width, s.multiple) == (8, 40, 4)
