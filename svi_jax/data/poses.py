"""``python -m svi_jax.data pose``: skeleton videos for SVI-Dance training and sampling.

From videos (DWPose on onnxruntime, ``scripts/data_preprocess/prepare_video_pose.py``)::

  python -m svi_jax.data pose --videos raw/ --out dances/ --det yolox_l.onnx --pose_model dw-ll_ucoco_384.onnx

or from keypoints extracted by any tool (``--keypoints DIR`` of ``<name>.npz`` / ``<name>.json``, see
:func:`read_keypoints`)::

  python -m svi_jax.data pose --keypoints kps/ --videos raw/ --out dances/

For every video ``<rel>.mp4`` under ``--videos`` it writes ``OUT/<rel>.mp4`` (the frames as processed: landscape
frames centre-cropped to a square, halved when 2048+ pixels wide, as the official script), ``OUT/<rel>.pose.mp4``
(the skeletons: body + feet + hands, :mod:`svi_jax.data.skeleton`) and ``OUT/<rel>.keypoints.npz`` (the first
person's 134 OpenPose-ordered points and scores per frame); caption CSVs are copied, so ``OUT`` builds directly
(``python -m svi_jax.data build --videos OUT``, every clip with its pose). A video in which no frame has a detected
person (or whose keypoints have no visible point) is skipped and counted; so are unreadable and too long ones.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil

import numpy as np

from svi_jax.data.scan import POSE_SUFFIX, is_video
from svi_jax.data.skeleton import SCORE_THRESHOLD, draw_pose, to_openpose

log = logging.getLogger(__name__)
MAX_FRAMES = 2000           # the official script skips videos with 2000 frames or more


class KeypointError(ValueError):
    """A keypoint file that cannot be read (the message names it and the field)."""


def list_videos(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if is_video(f)]
    return sorted(out)


def official_crop(frame: np.ndarray) -> np.ndarray:
    """Landscape -> centre square (``frame[:, margin:-margin]``), halved at 2048+ pixels wide, even sizes (mp4).

    The official ``frame[:, margin:-margin]`` is empty when ``margin`` is 0 (width = height + 1); here that frame
    stays as it is."""
    import cv2

    h, w = frame.shape[:2]
    if w > h:
        m = (w - h) // 2
        frame = frame[:, m:w - m]
    h, w = frame.shape[:2]
    if w >= 2048:
        frame = cv2.resize(frame, (w // 2, h // 2))
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]


def _fps(path: str) -> float:
    try:
        from svi_jax.data.video import probe_video

        return float(probe_video(path).fps) or 25.0
    except Exception:  # noqa: BLE001 - any probe failure: the official 25 fps
        return 25.0


def _write(out_base: str, frames, skeletons, keypoints, scores, detected, fps: float, crf: int):
    from svi_jax.data.video import write_video

    os.makedirs(os.path.dirname(out_base) or ".", exist_ok=True)
    if frames is not None:
        write_video(out_base + ".mp4", frames, fps=fps, crf=crf)
    write_video(out_base + POSE_SUFFIX, skeletons, fps=fps, crf=0, pix_fmt="yuv444p")   # keep thin lines' colours
    np.savez_compressed(out_base + ".keypoints.npz", keypoints=keypoints.astype(np.float32),
                        scores=scores.astype(np.float32), detected=np.asarray(detected, np.int32),
                        height=np.int32(skeletons.shape[1]), width=np.int32(skeletons.shape[2]))


def extract(videos: str, out: str, det: str, pose_model: str, max_frames: int = MAX_FRAMES, crf: int = 17,
            progress: bool = True, model=None) -> dict:
    """DWPose skeletons of every video under ``videos`` into ``out``; returns the summary (kept, skipped)."""
    from tqdm import tqdm

    from svi_jax import video_io
    from svi_jax.data.dwpose import Wholebody

    model = model or Wholebody(det, pose_model)
    summary = {"kept": 0, "skipped": collections.Counter(), "frames_without_person": 0, "videos": {}}
    for rel in tqdm(list_videos(videos), desc="poses", unit="video", disable=not progress):
        src = os.path.join(videos, rel)
        try:
            raw = video_io.read_mp4(src)
        except Exception as e:  # noqa: BLE001 - ffmpeg errors
            _skip(summary, rel, "unreadable", str(e)[:200])
            continue
        if len(raw) == 0:
            _skip(summary, rel, "no_frames", "")
            continue
        if max_frames and len(raw) >= max_frames:
            _skip(summary, rel, "too_long", f"{len(raw)} frames >= {max_frames}")
            continue
        frames = np.stack([official_crop(f) for f in raw])
        kps, scs, found, skel = [], [], [], []
        for f in frames:
            k, s = model(np.ascontiguousarray(f[..., ::-1]))          # BGR, as cv2.VideoCapture gives
            found.append(model.last_detected)
            kps.append(k[0])
            scs.append(s[0])
            skel.append(draw_pose(k, s, f.shape[0], f.shape[1]))
        if not any(found):
            _skip(summary, rel, "no_person", "no person detected in any frame")
            continue
        summary["frames_without_person"] += int(sum(1 for n in found if n == 0))
        _write(os.path.join(out, os.path.splitext(rel)[0]), frames, np.stack(skel), np.stack(kps), np.stack(scs),
               found, _fps(src), crf)
        summary["kept"] += 1
        summary["videos"][rel] = {"frames": int(len(frames)), "frames_without_person": int(found.count(0))}
    _copy_captions(videos, out)
    return _finish(summary, out)


def read_keypoints(path: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(keypoints [T, 134, 2] pixels, scores [T, 134], height, width)`` from a keypoint file.

    ``.npz``: ``keypoints [T, K, 2]`` or ``[T, N, K, 2]`` (first person used), ``scores`` likewise, ``height``,
    ``width``. ``.json``: ``{"height": H, "width": W, "frames": [{"keypoints": [[x, y], ...], "scores": [...]},
    ...]}``. ``K`` = 133 (DWPose / COCO-WholeBody order; the neck is added and the points reordered) or 134
    (OpenPose order with the neck, as ``OUT/*.keypoints.npz``)."""
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            kp = np.asarray([fr["keypoints"] for fr in d["frames"]], np.float64)
            sc = np.asarray([fr["scores"] for fr in d["frames"]], np.float64)
            h, w = int(d["height"]), int(d["width"])
        else:
            with np.load(path) as z:
                kp, sc = np.asarray(z["keypoints"], np.float64), np.asarray(z["scores"], np.float64)
                h, w = int(z["height"]), int(z["width"])
    except KeyError as e:
        raise KeypointError(f"{path}: missing field {e}") from None
    except (OSError, ValueError, TypeError) as e:
        raise KeypointError(f"{path}: cannot read keypoints: {e}") from None
    if kp.ndim == 4:
        kp, sc = kp[:, 0], sc[:, 0]
    if kp.ndim != 3 or kp.shape[-1] != 2 or sc.shape != kp.shape[:2] or kp.shape[1] not in (133, 134):
        raise KeypointError(f"{path}: keypoints {kp.shape} / scores {sc.shape}: expected [T, 133 or 134, 2] / "
                            f"[T, 133 or 134]")
    if kp.shape[1] == 133:
        kp, sc = to_openpose(kp, sc)
    return kp, sc, h, w


def draw_keypoint_dir(keypoints: str, out: str, videos: str | None = None, crf: int = 17,
                      progress: bool = True) -> dict:
    """Skeleton videos from keypoint files; with ``videos``, the matching ``<name>.mp4`` is copied beside each."""
    from tqdm import tqdm

    files = []
    for d, _, fs in os.walk(keypoints):
        files += [os.path.relpath(os.path.join(d, f), keypoints) for f in fs if f.endswith((".npz", ".json"))]
    summary = {"kept": 0, "skipped": collections.Counter(), "frames_without_person": 0, "videos": {}}
    for rel in tqdm(sorted(files), desc="skeletons", unit="file", disable=not progress):
        stem = rel[: -len(".keypoints.npz")] if rel.endswith(".keypoints.npz") else os.path.splitext(rel)[0]
        try:
            kp, sc, h, w = read_keypoints(os.path.join(keypoints, rel))
        except KeypointError as e:
            _skip(summary, rel, "bad_keypoints", str(e))
            continue
        visible = (sc > SCORE_THRESHOLD).any(axis=1)
        if not visible.any():
            _skip(summary, rel, "no_person", "no keypoint above the score threshold in any frame")
            continue
        skel = np.stack([draw_pose(kp[t:t + 1], sc[t:t + 1], h, w) for t in range(len(kp))])
        skel = skel[:, : h - h % 2, : w - w % 2]
        src_video = next((os.path.join(videos, stem + e) for e in (".mp4", ".avi", ".mov", ".mkv")
                          if videos and os.path.isfile(os.path.join(videos, stem + e))), None)
        base = os.path.join(out, stem)
        _write(base, None, skel, kp, sc, visible.astype(np.int32), _fps(src_video) if src_video else 25.0, crf)
        if src_video:
            shutil.copyfile(src_video, base + os.path.splitext(src_video)[1])
        summary["kept"] += 1
        summary["frames_without_person"] += int((~visible).sum())
        summary["videos"][rel] = {"frames": int(len(kp)), "frames_without_person": int((~visible).sum())}
    if videos:
        _copy_captions(videos, out)
    return _finish(summary, out)


def _skip(summary, rel, reason, detail):
    summary["skipped"][reason] += 1
    log.warning("skipped %s: %s %s", rel, reason, detail)
    print(f"skipped {rel}: {reason}{' (' + detail + ')' if detail else ''}")


def _copy_captions(videos: str, out: str):
    for d, _, fs in os.walk(videos):
        for f in fs:
            if f.lower().endswith(".csv"):
                dst = os.path.join(out, os.path.relpath(os.path.join(d, f), videos))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(os.path.join(d, f), dst)


def _finish(summary, out) -> dict:
    summary["skipped"] = dict(summary["skipped"])
    summary["skipped_total"] = sum(summary["skipped"].values())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "poses.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def add_arguments(p):
    p.add_argument("--videos", help="folder of videos (official layout or flat); with --keypoints: the videos "
                                    "to copy beside the skeletons")
    p.add_argument("--out", required=True, help="output folder (videos + .pose.mp4 + .keypoints.npz)")
    p.add_argument("--det", help="YOLOX person detector ONNX file (yolox_l.onnx)")
    p.add_argument("--pose_model", dest="pose_model",
                   help="DWPose whole-body ONNX file (dw-ll_ucoco_384.onnx)")
    p.add_argument("--keypoints", help="draw from extracted keypoints (.npz/.json per video) instead of DWPose")
    p.add_argument("--max_frames", type=int, default=MAX_FRAMES, help="skip videos with this many frames or more "
                   "(official 2000; 0 = no limit)")
    p.add_argument("--crf", type=int, default=17)
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    from svi_jax.data.dwpose import PoseModelError

    try:
        if args.keypoints:
            s = draw_keypoint_dir(args.keypoints, args.out, args.videos, args.crf, not args.quiet)
        else:
            if not args.videos:
                print("error: give --videos DIR (and --det, --pose_model), or --keypoints DIR", flush=True)
                return 2
            s = extract(args.videos, args.out, args.det, args.pose_model, args.max_frames, args.crf, not args.quiet)
    except (PoseModelError, ImportError) as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{k} {v}" for k, v in s["skipped"].items())
    print(f"wrote skeletons of {s['kept']} video(s) to {args.out}; skipped {s['skipped_total']}"
          f"{' (' + reasons + ')' if reasons else ''}; {s['frames_without_person']} frame(s) without a person")
    return 0 if s["kept"] else 1
