"""DWPose on onnxruntime, as the official ``dwpose/onnxdet.py``, ``onnxpose.py`` and ``wholebody.py``: a YOLOX person
detector (``yolox_l.onnx``, 640x640 letterbox with 114 padding) and the RTMPose-style whole-body model
(``dw-ll_ucoco_384.onnx``, SimCC outputs, 133 keypoints) on each person box (bbox padding 1.25, aspect-fixed affine
crop, ImageNet mean/std). Images are BGR, as the official code feeds OpenCV frames. Users give the ONNX files;
nothing is downloaded. No detected person: the pose model runs on the whole image (official fallback), and the
frame is reported as such (``Wholebody.last_detected``).
"""
from __future__ import annotations

import os

import numpy as np

from svi_jax.data.skeleton import _cv2, to_openpose

DET_SIZE = (640, 640)
NMS_THR, SCORE_THR, BOX_THR = 0.45, 0.1, 0.3
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


class PoseModelError(RuntimeError):
    """An ONNX model file that is missing or cannot be run."""


# ------------------------------------------------------------------------------------------------ detector


def nms(boxes, scores, thr):
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thr)[0] + 1]
    return keep


def person_boxes(predictions: np.ndarray, ratio: float) -> np.ndarray:
    """YOLOX decoded predictions ``[A, 5 + classes]`` -> person boxes ``[n, 4]`` (xyxy, original pixels): class-
    aware NMS (0.45) over scores > 0.1, then class 0 with score > 0.3 (``inference_detector``)."""
    boxes = predictions[:, :4]
    scores = predictions[:, 4:5] * predictions[:, 5:]
    xyxy = np.ones_like(boxes)
    xyxy[:, 0] = boxes[:, 0] - boxes[:, 2] / 2.0
    xyxy[:, 1] = boxes[:, 1] - boxes[:, 3] / 2.0
    xyxy[:, 2] = boxes[:, 0] + boxes[:, 2] / 2.0
    xyxy[:, 3] = boxes[:, 1] + boxes[:, 3] / 2.0
    xyxy /= ratio
    dets = []
    for c in range(scores.shape[1]):
        m = scores[:, c] > SCORE_THR
        if m.sum() == 0:
            continue
        keep = nms(xyxy[m], scores[m, c], NMS_THR)
        if keep:
            dets.append(np.concatenate([xyxy[m][keep], scores[m, c][keep, None], np.full((len(keep), 1), c)], 1))
    if not dets:
        return np.zeros((0, 4))
    d = np.concatenate(dets, 0)
    return d[(d[:, 4] > BOX_THR) & (d[:, 5] == 0), :4]


def yolox_decode(out: np.ndarray, size=DET_SIZE) -> np.ndarray:
    grids, strides = [], []
    for s in (8, 16, 32):
        hs, ws = size[0] // s, size[1] // s
        xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
        g = np.stack((xv, yv), 2).reshape(1, -1, 2)
        grids.append(g)
        strides.append(np.full((*g.shape[:2], 1), s))
    grids, strides = np.concatenate(grids, 1), np.concatenate(strides, 1)
    out = out.copy()
    out[..., :2] = (out[..., :2] + grids) * strides
    out[..., 2:4] = np.exp(out[..., 2:4]) * strides
    return out


def letterbox(img: np.ndarray, size=DET_SIZE) -> tuple[np.ndarray, float]:
    cv2 = _cv2()
    padded = np.ones((size[0], size[1], 3), np.uint8) * 114
    r = min(size[0] / img.shape[0], size[1] / img.shape[1])
    resized = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)),
                         interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    padded[: int(img.shape[0] * r), : int(img.shape[1] * r)] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), np.float32), r


# ------------------------------------------------------------------------------------------------ pose model


def _warp_matrix(center, scale, out_w, out_h):
    cv2 = _cv2()

    def third(a, b):
        d = a - b
        return b + np.r_[-d[1], d[0]]

    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, scale[0] * -0.5])
    src[2] = third(src[0], src[1])
    dst[0] = [out_w * 0.5, out_h * 0.5]
    dst[1] = np.array([out_w * 0.5, out_h * 0.5]) + np.array([0.0, out_w * -0.5])
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def crop_person(img: np.ndarray, box, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(normalised crop [h, w, 3], center, scale)`` of one box (``onnxpose.preprocess``; ``size = (w, h)``)."""
    cv2 = _cv2()
    x0, y0, x1, y1 = box
    center = np.array([x0 + x1, y0 + y1]) * 0.5
    scale = np.array([x1 - x0, y1 - y0]) * 1.25
    w, h = size
    aspect = w / h
    sw, sh = scale
    scale = np.array([sw, sw / aspect]) if sw > sh * aspect else np.array([sh * aspect, sh])
    crop = cv2.warpAffine(img, _warp_matrix(center, scale, w, h), (int(w), int(h)), flags=cv2.INTER_LINEAR)
    return (crop - MEAN) / STD, center, scale


def simcc_decode(simcc_x, simcc_y, split_ratio: float = 2.0):
    n, k, _ = simcc_x.shape
    sx, sy = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
    locs = np.stack((np.argmax(sx, 1), np.argmax(sy, 1)), -1).astype(np.float32)
    vx, vy = np.amax(sx, 1), np.amax(sy, 1)
    vals = np.where(vx > vy, vy, vx)
    locs[vals <= 0.0] = -1
    return locs.reshape(n, k, 2) / split_ratio, vals.reshape(n, k)


class Wholebody:
    """``(keypoints [N, 134, 2] pixels, scores [N, 134])`` in OpenPose order for a BGR image."""

    def __init__(self, det_path: str, pose_path: str, providers=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise PoseModelError("DWPose needs onnxruntime: pip install onnxruntime (or pip install -e '.[pose]')") \
                from None
        for what, p in (("detector (yolox_l.onnx)", det_path), ("pose model (dw-ll_ucoco_384.onnx)", pose_path)):
            if not p or not os.path.isfile(p):
                raise PoseModelError(f"the DWPose {what} file {p!r} does not exist; download it yourself and pass "
                                     f"its path (nothing is downloaded here)")
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.det = ort.InferenceSession(det_path, providers=providers)
            self.pose = ort.InferenceSession(pose_path, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PoseModelError(f"cannot load the DWPose ONNX models ({det_path}, {pose_path}): {e}") from None
        self.last_detected = 0

    def boxes(self, img: np.ndarray) -> np.ndarray:
        x, ratio = letterbox(img)
        out = self.det.run(None, {self.det.get_inputs()[0].name: x[None]})[0]
        return person_boxes(yolox_decode(out)[0], ratio)

    def __call__(self, img: np.ndarray):
        boxes = self.boxes(img)
        self.last_detected = len(boxes)
        if len(boxes) == 0:
            boxes = np.array([[0, 0, img.shape[1], img.shape[0]]])      # official fallback: the whole image
        h, w = self.pose.get_inputs()[0].shape[2:]
        kps, scs = [], []
        for box in boxes:
            crop, center, scale = crop_person(img, box, (w, h))
            names = [o.name for o in self.pose.get_outputs()]
            sx, sy = self.pose.run(names, {self.pose.get_inputs()[0].name:
                                                np.asarray(crop.transpose(2, 0, 1), np.float32)[None]})[:2]
            k, s = simcc_decode(sx, sy)
            kps.append(k[0] / np.array([w, h]) * scale + center - scale / 2)
            scs.append(s[0])
        return to_openpose(np.array(kps), np.array(scs))
