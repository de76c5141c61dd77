"""Skeleton drawing as SVI-Dance's pose extraction does it (``scripts/data_preprocess/prepare_video_pose.py``,
``dwpose/util.py``, ``dwpose/wholebody.py``): body + feet + hands, no face.

* DWPose's 133 COCO-WholeBody keypoints get a neck (mean of the shoulders; score 1 only when both shoulder scores
  are > 0.3) inserted at 17 and are reordered to OpenPose order (``Wholebody.__call__``) -> 134 points:
  0-17 body, 18-23 feet, 24-91 face, 92-112 / 113-133 the two hands.
* Only the first person is drawn (``candidate[0]``). Points with score <= 0.3 are dropped (coordinates -1).
  Body + feet (``draw_body_and_foot``): the 18 body points plus point 18 = mean of the big toe and small toe of one
  foot (points 18, 19) and point 19 = that of the other (21, 22), each only when both are visible; 19 limbs as
  filled ellipses (half-width 4, 18 body colours + 2 foot colours), the canvas scaled by 0.6, then 20 joint discs
  of radius 4. Hands (``draw_handpose``): 20 edges of width 2 in HSV-rainbow colours, joints as radius-4 discs in
  (0, 0, 255); a point counts when both its pixel coordinates are > 0.01.
* The official canvas is drawn in OpenCV's BGR context and stored with ``cv2.imencode``, so the stored image, read
  as RGB (PIL, imageio), has the colours' channels reversed: :func:`draw_pose` returns that RGB image.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

SCORE_THRESHOLD = 0.3
HAND_EPS = 0.01
STICK_WIDTH = 4

LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14],
         [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [14, 19], [11, 20]]          # 1-based, as the official
COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
          [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
          [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85], [170, 255, 255], [255, 255, 0]]
HAND_EDGES = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11], [11, 12],
              [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("skeleton drawing needs OpenCV: pip install opencv-python-headless "
                          "(or pip install -e '.[pose]')") from None
    return cv2


def to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DWPose output ``[N, 133, 2]`` (pixels), ``[N, 133]`` -> OpenPose order with the neck, ``[N, 134, ...]``."""
    info = np.concatenate([keypoints, scores[..., None]], axis=-1)
    neck = np.mean(info[:, [5, 6]], axis=1)
    neck[:, 2:4] = np.logical_and(info[:, 5, 2:4] > SCORE_THRESHOLD, info[:, 6, 2:4] > SCORE_THRESHOLD).astype(int)
    new = np.insert(info, 17, neck, axis=1)
    new[:, OPENPOSE_IDX] = new[:, MMPOSE_IDX]
    return new[..., :2], new[..., 2]


def person_parts(keypoints: np.ndarray, scores: np.ndarray, height: int, width: int) -> dict:
    """One person's 134 OpenPose-ordered points (pixels) -> the drawn parts (``DWposeDetector.__call__``):
    ``body [20, 2]`` normalised (-1 = missing), ``body_visible [20]``, ``hands [2, 21, 2]`` normalised."""
    cand = np.asarray(keypoints, np.float64).copy()
    s = np.asarray(scores, np.float64)
    cand[:, 0] /= float(width)
    cand[:, 1] /= float(height)
    cand[s < SCORE_THRESHOLD] = -1
    vis = s[:24] > SCORE_THRESHOLD
    body = cand[:24].copy()
    feet_vis = []
    for out, (a, b) in ((18, (18, 19)), (19, (21, 22))):
        ok = bool(vis[a] and vis[b])                  # official: the score test on the 2 toes
        pts = (cand[a], cand[b])
        # official: and the averaged point is used only when neither toe is -1 (always true when visible)
        ok_xy = -1 not in pts[0] and -1 not in pts[1]
        body[out] = (pts[0] + pts[1]) / 2 if ok_xy else np.array([-1.0, -1.0])
        feet_vis.append(ok)
    body = body[:20]
    visible = np.concatenate([vis[:18], feet_vis])
    hands = np.stack([cand[92:113], cand[113:134]])
    return {"body": body, "body_visible": visible, "hands": hands}


def draw_parts(parts: dict, height: int, width: int) -> np.ndarray:
    """The official canvas (BGR context) of one person: body + feet, then hands."""
    cv2 = _cv2()
    canvas = np.zeros((height, width, 3), np.uint8)
    body, vis = parts["body"], parts["body_visible"]
    H, W = float(height), float(width)
    for i, (a, b) in enumerate(LIMBS):
        a, b = a - 1, b - 1
        if not (vis[a] and vis[b]):
            continue
        ys = np.array([body[a, 0], body[b, 0]]) * W     # the official names are swapped: Y is x (width)
        xs = np.array([body[a, 1], body[b, 1]]) * H
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
        poly = cv2.ellipse2Poly((int(np.mean(ys)), int(np.mean(xs))), (int(length / 2), STICK_WIDTH), int(angle),
                                0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(20):
        if vis[i]:
            cv2.circle(canvas, (int(body[i, 0] * W), int(body[i, 1] * H)), 4, COLORS[i], thickness=-1)
    for peaks in parts["hands"]:
        px = [(int(x * W), int(y * H)) for x, y in peaks]
        for ie, (a, b) in enumerate(HAND_EDGES):
            (x1, y1), (x2, y2) = px[a], px[b]
            if x1 > HAND_EPS and y1 > HAND_EPS and x2 > HAND_EPS and y2 > HAND_EPS:
                color = [c * 255 for c in colorsys.hsv_to_rgb(ie / float(len(HAND_EDGES)), 1.0, 1.0)]
                cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
        for x, y in px:
            if x > HAND_EPS and y > HAND_EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def draw_pose(keypoints: np.ndarray, scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB uint8 skeleton image of the first person of ``keypoints [N, 134, 2]`` (pixels, OpenPose order) with
    ``scores [N, 134]``, as the official pipeline stores it (see the module doc); black if ``N == 0``."""
    if len(keypoints) == 0:
        return np.zeros((height, width, 3), np.uint8)
    canvas = draw_parts(person_parts(keypoints[0], scores[0], height, width), height, width)
    return np.ascontiguousarray(canvas[..., ::-1])
