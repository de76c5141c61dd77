"""Find the videos of a folder and their captions (official SVI layout or a flat folder + CSV)."""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import os
from typing import Optional

from svi_jax.data.video import VIDEO_EXTENSIONS

OFFICIAL_FILE_COLUMN = "Filename"
OFFICIAL_CAPTION_COLUMN = "Video Description"
CAPTION_ERRORS = ("skip", "replace", "cp1252")


class CaptionError(ValueError):
    """A caption CSV that cannot be used at all (wrong schema, no usable row, unparsable)."""


@dataclasses.dataclass
class Entry:
    path: str  # absolute path of the video (may not exist: CSV rows naming missing files)
    key: str  # path relative to the videos folder, '/'-separated; unique
    caption: Optional[str]
    category: str
    caption_source: str  # 'csv' or 'fallback'
    skip: Optional[tuple] = None  # (reason, detail) decided while scanning


@dataclasses.dataclass
class Scan:
    layout: str  # 'categories' or 'flat'
    entries: list
    notes: collections.Counter  # counted non-fatal events (fallback captions, duplicate rows, ...)


def fallback_caption(category: str) -> str:
    return f"A video from {category} category"


#: A video's skeleton stream (SVI-Dance): ``clip.mp4`` + ``clip.pose.mp4``, stored with the clip, not a clip itself.
POSE_SUFFIX = ".pose.mp4"


def is_video(name: str) -> bool:
    return (name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")
            and not name.lower().endswith(POSE_SUFFIX))


def pose_path(video_path: str) -> str:
    """Where a video's skeleton video lives (``python -m svi_jax.data pose`` writes it)."""
    return os.path.splitext(video_path)[0] + POSE_SUFFIX


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _fix_caption(s: str, policy: str) -> Optional[str]:
    """Caption text whose undecodable bytes were kept as surrogates: None (skip), or recovered."""
    if not _has_surrogates(s):
        return s
    raw = s.encode("utf-8", "surrogateescape")
    if policy == "replace":
        return raw.decode("utf-8", "replace")
    if policy == "cp1252":
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return None


def _match_column(fields: list, wanted: str) -> Optional[str]:
    if wanted in fields:
        return wanted
    folded = [f for f in fields if f.strip().casefold() == wanted.strip().casefold()]
    return folded[0] if len(folded) == 1 else None


def read_caption_csv(path: str, file_column: str = OFFICIAL_FILE_COLUMN,
                     caption_column: str = OFFICIAL_CAPTION_COLUMN, encoding: str = "utf-8",
                     caption_errors: str = "skip", notes: Optional[collections.Counter] = None):
    """{file name as written: caption or None (undecodable caption)}. Raises CaptionError on bad schema.

    Column names match exactly or, failing that, case/space-insensitively. Rows with an empty file
    name or caption are counted (notes['csv_empty_row']); a CSV without one usable row is an error.
    """
    if caption_errors not in CAPTION_ERRORS:
        raise ValueError(f"caption_errors must be one of {CAPTION_ERRORS}")
    notes = notes if notes is not None else collections.Counter()
    expected = f"expected a header row with columns {file_column!r} and {caption_column!r}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CaptionError(f"cannot read caption CSV {path}: {e}") from e
    if not raw.strip():
        raise CaptionError(f"caption CSV {path} is empty; {expected}")
    text = raw.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding,
                      "surrogateescape")
    if "\x00" in text:
        raise CaptionError(f"caption CSV {path} contains NUL bytes (binary file or UTF-16?); {expected}, "
                           "UTF-8 encoded")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as e:
        raise CaptionError(f"caption CSV {path}: cannot parse the header ({e}); {expected}") from e
    header = [h.strip() for h in header]
    fcol, ccol = _match_column(header, file_column), _match_column(header, caption_column)
    if fcol is None or ccol is None:
        missing = [c for c, m in ((file_column, fcol), (caption_column, ccol)) if m is None]
        raise CaptionError(f"caption CSV {path} has columns {header} but lacks {missing}; {expected}")
    fi, ci = header.index(fcol), header.index(ccol)
    out = {}
    rows = 0
    line = 1
    try:
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                notes["csv_empty_row"] += 1     # a blank line: noted, as docs/data.md says
                continue
            rows += 1
            name = row[fi].strip() if fi < len(row) else ""
            caption = row[ci].strip() if ci < len(row) else ""
            if not name or not caption:
                notes["csv_empty_row"] += 1
                continue
            fixed = _fix_caption(caption, caption_errors)
            if fixed is not caption and fixed is not None:
                notes["caption_recovered_" + caption_errors] += 1
            name = name.replace("\\", "/")
            if name in out:
                notes["csv_duplicate_row"] += 1
            out[name] = fixed
    except csv.Error as e:
        raise CaptionError(f"caption CSV {path}, line {line}: {e}") from e
    if not out:
        raise CaptionError(f"caption CSV {path} has no usable row ({rows} rows, none with both a "
                           f"{fcol!r} and a {ccol!r} value)")
    return out


def _entry(root: str, rel: str, category: str, caption, source: str) -> Entry:
    e = Entry(path=os.path.join(root, rel), key=rel.replace(os.sep, "/"), caption=caption,
              category=category, caption_source=source)
    if caption is None:
        e.skip = ("caption_not_utf8", "caption is not valid UTF-8 (see --caption_errors)")
    return e


def scan_folder(videos: str, captions: Optional[str] = None, file_column: str = OFFICIAL_FILE_COLUMN,
                caption_column: str = OFFICIAL_CAPTION_COLUMN, encoding: str = "utf-8",
                caption_errors: str = "skip") -> Scan:
    """Entries for every video (plus CSV rows whose file is missing, marked to skip).

    Official layout (no `captions`, and `videos` has subfolders): each subfolder is a category holding
    its videos and `<category>.csv`; a video without a row gets "A video from <category> category".
    Flat (`captions` given, or no subfolders): all videos below `videos`; rows match by relative path,
    else by unique base name; with a CSV, videos without a row are skipped ('no_caption'); without one
    every video gets the fallback caption of the folder's name.
    """
    videos = os.path.abspath(videos)
    if not os.path.isdir(videos):
        raise FileNotFoundError(f"videos folder {videos} does not exist")
    notes = collections.Counter()
    entries = []
    subdirs = sorted(d for d in os.listdir(videos)
                     if os.path.isdir(os.path.join(videos, d)) and not d.startswith("."))
    if captions is None and subdirs:
        for name in sorted(os.listdir(videos)):
            if is_video(name) and os.path.isfile(os.path.join(videos, name)):
                notes["video_outside_category"] += 1
        for cat in subdirs:
            folder = os.path.join(videos, cat)
            files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
            vids = [f for f in files if is_video(f)]
            notes["ignored_files"] += sum(1 for f in files if not is_video(f) and f != f"{cat}.csv")
            csv_path = os.path.join(folder, f"{cat}.csv")
            rows = {}
            if os.path.exists(csv_path):
                rows = read_caption_csv(csv_path, OFFICIAL_FILE_COLUMN, OFFICIAL_CAPTION_COLUMN, encoding,
                                        caption_errors, notes)
                rows = {os.path.basename(k): v for k, v in rows.items()}
            else:
                notes["category_without_csv"] += 1
            for f in vids:
                if f in rows:
                    entries.append(_entry(videos, os.path.join(cat, f), cat, rows[f], "csv"))
                else:
                    entries.append(_entry(videos, os.path.join(cat, f), cat, fallback_caption(cat), "fallback"))
            for f in sorted(set(rows) - set(vids)):
                e = _entry(videos, os.path.join(cat, f), cat, rows[f], "csv")
                e.skip = ("missing_file", f"named in {cat}.csv but not in {folder}")
                entries.append(e)
        return Scan("categories", entries, notes)

    found = []
    for root, dirs, files in os.walk(videos):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(root, f), videos).replace(os.sep, "/")
            if is_video(f):
                found.append(rel)
            elif captions is None or os.path.abspath(os.path.join(root, f)) != os.path.abspath(captions):
                notes["ignored_files"] += 1
    category = os.path.basename(videos.rstrip("/"))
    if captions is None:
        return Scan("flat", [_entry(videos, r, category, fallback_caption(category), "fallback")
                             for r in found], notes)
    rows = read_caption_csv(captions, file_column, caption_column, encoding, caption_errors, notes)
    by_base = collections.defaultdict(list)
    for r in found:
        by_base[os.path.basename(r)].append(r)
    used = set()
    for r in found:
        if r in rows:
            caption, hit = rows[r], r
        elif len(by_base[os.path.basename(r)]) == 1 and os.path.basename(r) in rows:
            hit = os.path.basename(r)
            caption = rows[hit]
        else:
            e = _entry(videos, r, category, "", "none")
            e.skip = ("no_caption", f"no row in {os.path.basename(captions)}")
            entries.append(e)
            continue
        used.add(hit)
        entries.append(_entry(videos, r, category, caption, "csv"))
    for name in sorted(set(rows) - used):
        e = _entry(videos, name, category, rows[name], "csv")
        if name in by_base and len(by_base[name]) > 1:
            e.skip = ("ambiguous_name", f"{name} matches {len(by_base[name])} videos; use a relative path")
        elif not is_video(name):
            e.skip = ("missing_file", f"{name} (named in the CSV) is not a video file name")
        else:
            e.skip = ("missing_file", f"named in {os.path.basename(captions)} but not found")
        entries.append(e)
    return Scan("flat", entries, notes)
