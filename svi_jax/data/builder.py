"""TFDS dataset of videos + captions, written as array_record and read with a TFDS data source.

Works without TensorFlow: the features are plain `tfds.features.Tensor`/`Scalar`/`Text`, whose
serialisation and parsing TFDS does with its numpy code path when TF is absent. Each example stores the
video file's bytes as they are (decoding happens in the loader, only for the sampled window) plus what the
build-time probe measured (decodable frame count, display size, fps), so the loader needs no probing.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from svi_jax.data import scan as scan_lib
from svi_jax.data.video import VideoError, probe_video

DATASET_NAME = "svi_videos"
VERSION = "1.0.0"
SUMMARY_FILE = "summary.json"


class NoUsableVideos(ValueError):
    """Every candidate video was skipped (or there were none); .summary says why."""

    def __init__(self, summary: dict):
        reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "no video files found"
        super().__init__(f"no usable video in {summary['videos']} ({summary['candidates']} candidates; "
                         f"skipped: {reasons}); details in {SUMMARY_FILE}.failed")
        self.summary = summary


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "video": tfds.features.Tensor(shape=(), dtype=np.object_),  # the file's bytes
        "key": tfds.features.Text(),  # path relative to the videos folder
        "caption": tfds.features.Text(),
        "category": tfds.features.Text(),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "height": tfds.features.Scalar(dtype=np.int32),
        "width": tfds.features.Scalar(dtype=np.int32),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "ext": tfds.features.Text(),
        "pose": tfds.features.Tensor(shape=(), dtype=np.object_),  # the skeleton video's bytes, b"" if none
        # SVI-Talk: the audio track's wav2vec2 features [T25, layers, hidden] float32 as .npy bytes, b"" if none
        "audio": tfds.features.Tensor(shape=(), dtype=np.object_),
    })


class SviVideos(tfds.core.GeneratorBasedBuilder):
    """Videos with captions; one example per usable video file. Build with build_dataset()."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Encoded video bytes + probe metadata + caption."}

    def __init__(self, *, videos: Optional[str] = None, scan: Optional[scan_lib.Scan] = None,
                 min_frames: int = 5, min_size: int = 16, max_decode_errors: int = 0,
                 max_bytes: int = 2_000_000_000, workers: int = 2, progress: bool = True, clip_frames: int = 81,
                 audio_features: Optional[Callable[[str], np.ndarray]] = None, **kwargs):
        self._videos = videos
        self._scan = scan
        self._limits = dict(min_frames=min_frames, min_size=min_size, max_decode_errors=max_decode_errors,
                            max_bytes=max_bytes)
        self._clip_frames = int(clip_frames)
        self._workers = max(1, workers)
        self._progress = progress
        self._audio_features = audio_features   # SVI-Talk: video path -> features, or raises SkipVideo
        self.report = None
        super().__init__(**kwargs)

    def _log_download_bytes(self):  # TFDS prints download sizes; nothing is downloaded here
        pass

    def _log_download_done(self):
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        info = tfds.core.DatasetInfo(
            builder=self, features=features(), disable_shuffling=True,
            description="Video clips with captions for SVI training (video = encoded file bytes).")
        # DatasetBuilder.__init__ asks the public GCS bucket for precomputed info of a dataset not yet built;
        # ours is never there, and the call leaks an empty temp dir each time.
        info.initialize_from_bucket = lambda: None
        return info

    def _split_generators(self, dl_manager):
        if self._scan is None:
            raise ValueError("SviVideos needs scan= (use build_dataset) to generate examples")
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rep = _Report(self._scan, self._clip_frames)
        self.report = rep
        todo = [e for e in self._scan.entries if e.skip is None]
        for e in self._scan.entries:
            if e.skip is not None:
                rep.skip(e, *e.skip)
        lim = self._limits
        bar = tqdm(total=len(todo), desc="probing videos", unit="video", disable=not self._progress,
                   dynamic_ncols=True)
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            for e, res in zip(todo, _ordered_map(pool, _probe, todo, self._workers * 4)):
                bar.update(1)
                if isinstance(res, VideoError):
                    rep.skip(e, res.reason, res.detail)
                    continue
                size = os.path.getsize(e.path)
                if size > lim["max_bytes"]:
                    rep.skip(e, "too_large", f"{size} bytes > {lim['max_bytes']}")
                elif res.decode_errors > lim["max_decode_errors"]:
                    rep.skip(e, "decode_error", f"{res.decode_errors} decode errors, {res.num_frames} frames decoded")
                elif res.num_frames < lim["min_frames"]:
                    rep.skip(e, "too_few_frames", f"{res.num_frames} < {lim['min_frames']}")
                elif min(res.height, res.width) < lim["min_size"]:
                    rep.skip(e, "too_small", f"{res.width}x{res.height}, short side < {lim['min_size']}")
                else:
                    try:
                        with open(e.path, "rb") as f:
                            data = f.read()
                    except OSError as err:
                        rep.skip(e, "unreadable", str(err))
                        continue
                    pose = scan_lib.pose_path(e.path)
                    pose_data = b""
                    if os.path.isfile(pose):          # SVI-Dance: the skeleton video, stored with the clip
                        with open(pose, "rb") as f:
                            pose_data = f.read()
                    audio = b""
                    if self._audio_features is not None:
                        try:
                            audio = _npy_bytes(self._audio_features(e.path))
                        except SkipVideo as skip:
                            rep.skip(e, skip.reason, skip.detail)
                            continue
                    rep.keep(e, res, len(data))
                    bar.set_postfix(kept=rep.kept, skipped=sum(rep.skipped.values()), refresh=False)
                    yield e.key, {
                        "video": data, "key": e.key, "caption": e.caption, "category": e.category,
                        "num_frames": res.num_frames, "height": res.height, "width": res.width,
                        "fps": res.fps, "ext": os.path.splitext(e.path)[1].lower() or ".mp4",
                        "pose": pose_data, "audio": audio,
                    }
        bar.close()


def _probe(entry):
    try:
        return probe_video(entry.path)
    except VideoError as e:
        return e
    except OSError as e:
        return VideoError("unreadable", str(e))


def _ordered_map(pool, fn, items, lookahead):
    """pool.map with bounded lookahead (results in order)."""
    pending = collections.deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            break
    while pending:
        yield pending.popleft().result()
        for item in it:
            pending.append(pool.submit(fn, item))
            break


class _Report:
    def __init__(self, scan, clip_frames: int = 81):
        self.scan = scan
        self.clip_frames = int(clip_frames)   # the training clip length: shorter videos are noted
        self.kept = 0
        self.skipped = collections.Counter()
        self.skipped_files = []
        self.notes = collections.Counter(scan.notes)
        self.categories = collections.Counter()
        self.frames = []
        self.sizes = collections.Counter()
        self.bytes = 0

    def skip(self, entry, reason, detail=""):
        self.skipped[reason] += 1
        self.skipped_files.append({"file": entry.key, "reason": reason, "detail": detail})

    def keep(self, entry, info, nbytes):
        self.kept += 1
        self.categories[entry.category] += 1
        self.frames.append(info.num_frames)
        self.sizes[f"{info.width}x{info.height}"] += 1
        self.bytes += nbytes
        if info.grayscale:
            self.notes["grayscale"] += 1
        if entry.caption_source == "fallback":
            self.notes["fallback_caption"] += 1
        if info.num_frames < self.clip_frames:
            self.notes[f"shorter_than_{self.clip_frames}_frames"] += 1

    def as_dict(self):
        f = np.asarray(self.frames or [0])
        return {
            "layout": self.scan.layout,
            "candidates": len(self.scan.entries),
            "kept": self.kept,
            "skipped_total": int(sum(self.skipped.values())),
            "skipped": dict(sorted(self.skipped.items())),
            "notes": {k: v for k, v in sorted(self.notes.items()) if v},
            "categories": dict(sorted(self.categories.items())),
            "frames": {"min": int(f.min()), "max": int(f.max()), "mean": float(f.mean()),
                       "total": int(f.sum()) if self.frames else 0},
            "resolutions": dict(self.sizes.most_common(20)),
            "bytes": int(self.bytes),
            "skipped_files": self.skipped_files,
        }


class SkipVideo(Exception):
    """Raised by a per-video hook of the builder (``audio_features``): the video is skipped and counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a, np.float32))
    return buf.getvalue()


def npy_from_bytes(data) -> np.ndarray:
    """Inverse of the builder's ``.npy`` byte fields (``audio``): a read-only view of the bytes, not a copy (a long
    video's features are hundreds of MB and a clip reads only its windows of them)."""
    data = data.item() if isinstance(data, np.ndarray) else data
    f = io.BytesIO(data)
    fmt = np.lib.format
    header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(f))
    if header is not None:
        shape, fortran, dtype = header(f)
    if header is None or fortran or dtype.hasobject:      # not what the builder writes: the plain (copying) reader
        return np.load(io.BytesIO(data))
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=f.tell()).reshape(shape)


def dataset_dir(out: str) -> str:
    """The TFDS version folder inside a build output folder (or `out` itself if it is one)."""
    if os.path.exists(os.path.join(out, "dataset_info.json")):
        return out
    d = os.path.join(out, DATASET_NAME, VERSION)
    if os.path.exists(os.path.join(d, "dataset_info.json")):
        return d
    raise FileNotFoundError(f"no built {DATASET_NAME} dataset in {out} (expected {d}/dataset_info.json); "
                            "run `python -m svi_jax.data build` first")


def build_dataset(videos: str, out: str, *, captions: Optional[str] = None,
                  file_column: str = scan_lib.OFFICIAL_FILE_COLUMN,
                  caption_column: str = scan_lib.OFFICIAL_CAPTION_COLUMN, encoding: str = "utf-8",
                  caption_errors: str = "skip", min_frames: int = 5, min_size: int = 16,
                  max_decode_errors: int = 0, workers: int = 2, overwrite: bool = False,
                  progress: bool = True, clip_frames: int = 81,
                  audio_features: Optional[Callable[[str], np.ndarray]] = None) -> dict:
    """Scan, probe, and write the TFDS dataset under out/svi_videos/1.0.0; returns (and writes) the summary.

    Raises CaptionError at once for an unusable CSV and FileExistsError for an existing build unless
    overwrite. Skipped videos are listed in the summary with their reason. ``audio_features`` (SVI-Talk): a function
    from a video's path to its audio features, stored in the ``audio`` field; it raises :class:`SkipVideo` for a
    video to skip (no audio track, silent).
    """
    t0 = time.time()
    scan = scan_lib.scan_folder(videos, captions, file_column, caption_column, encoding, caption_errors)
    target = os.path.join(out, DATASET_NAME, VERSION)
    if os.path.exists(target):
        if not overwrite:
            raise FileExistsError(f"{target} exists: pass --overwrite to rebuild it")
        shutil.rmtree(target)
    os.makedirs(out, exist_ok=True)
    builder = SviVideos(videos=videos, scan=scan, min_frames=min_frames, min_size=min_size,
                        max_decode_errors=max_decode_errors, workers=workers, progress=progress,
                        clip_frames=clip_frames, audio_features=audio_features, data_dir=out,
                        file_format="array_record")
    failure = None
    with tempfile.TemporaryDirectory(prefix="svi_tfds_dl_") as dl:
        try:
            _quiet_tfds(lambda: builder.download_and_prepare(download_dir=dl))
        except Exception as e:  # TFDS refuses an empty split; anything else is re-raised below
            failure = e
    report = builder.report or _Report(scan, clip_frames)
    if failure is not None and report.kept > 0:
        raise failure
    summary = {
        "videos": os.path.abspath(videos),
        "captions": os.path.abspath(captions) if captions else None,
        "dataset_dir": os.path.abspath(target),
        **report.as_dict(),
        "limits": {"min_frames": min_frames, "min_size": min_size, "max_decode_errors": max_decode_errors},
        "seconds": round(time.time() - t0, 3),
    }
    with open(os.path.join(out, SUMMARY_FILE + (".failed" if report.kept == 0 else "")), "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    if report.kept == 0:
        shutil.rmtree(os.path.join(out, DATASET_NAME), ignore_errors=True)
        raise NoUsableVideos(summary)
    return summary


def _quiet_tfds(fn):
    """Run fn with TFDS's own progress bars and info logging off (ours is enough)."""
    import logging

    from absl import logging as absl_logging

    tfds.disable_progress_bar()
    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("tensorflow_datasets")
    old_level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return fn()
    finally:
        absl_logging.set_verbosity(old)
        logger.setLevel(old_level)
        tfds.enable_progress_bar()


def open_dataset(path: str, split: str = "train"):
    """Random-access TFDS data source (ArrayRecordDataSource) of a build; items are dicts of numpy/bytes."""
    builder = tfds.builder_from_directory(dataset_dir(path))
    return builder.as_data_source(split=split)


def format_summary(summary: dict) -> str:
    lines = [f"kept {summary['kept']} of {summary['candidates']} videos ({summary['layout']} layout), "
             f"skipped {summary['skipped_total']}"]
    for reason, n in summary["skipped"].items():
        lines.append(f"  skipped {reason:<18} {n}")
    for note, n in summary["notes"].items():
        lines.append(f"  note    {note:<18} {n}")
    if summary["categories"]:
        lines.append("  categories: " + ", ".join(f"{k} {v}" for k, v in summary["categories"].items()))
    fr = summary["frames"]
    lines.append(f"  frames per video: min {fr['min']} mean {fr['mean']:.1f} max {fr['max']}; "
                 f"{summary['bytes'] / 1e6:.1f} MB; {summary['seconds']:.1f}s")
    if summary["kept"]:
        lines.append(f"  dataset: {summary['dataset_dir']}")
    return "\n".join(lines)
