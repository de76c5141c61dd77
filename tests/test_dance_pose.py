"""DWPose skeletons: drawing vs a transcription of the official code (pixel-exact), the keypoint reordering, the
ONNX path on tiny random ONNX models (shapes, detection, the no-person case), and the CLI on videos and keypoints."""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from svi_jax.data import poses, skeleton  # noqa: E402
from svi_jax.data.dwpose import Wholebody, person_boxes, yolox_decode  # noqa: E402

H, W = 96, 80


# ------------------------------------------------------------------------------------- the official code, verbatim


def _official_draw_body_and_foot(canvas, candidate, subset):                     # dwpose/util.py
    H, W, C = canvas.shape
    candidate = np.array(candidate)
    subset = np.array(subset)
    stickwidth = 4
    limbSeq = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10],
               [10, 11], [2, 12], [12, 13], [13, 14], [2, 1], [1, 15], [15, 17],
               [1, 16], [16, 18], [14, 19], [11, 20]]
    colors = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
              [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
              [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85], [170, 255, 255], [255, 255, 0]]
    for i in range(19):
        for n in range(len(subset)):
            index = subset[n][np.array(limbSeq[i]) - 1]
            if -1 in index:
                continue
            Y = candidate[index.astype(int), 0] * float(W)
            X = candidate[index.astype(int), 1] * float(H)
            mX = np.mean(X)
            mY = np.mean(Y)
            length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
            polygon = cv2.ellipse2Poly((int(mY), int(mX)), (int(length / 2), stickwidth), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, colors[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(20):
        for n in range(len(subset)):
            index = int(subset[n][i])
            if index == -1:
                continue
            x, y = candidate[index][0:2]
            x = int(x * W)
            y = int(y * H)
            cv2.circle(canvas, (int(x), int(y)), 4, colors[i], thickness=-1)
    return canvas


def _official_draw_handpose(canvas, all_hand_peaks):                              # dwpose/util.py
    import matplotlib

    eps = 0.01
    H, W, C = canvas.shape
    edges = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10],
             [10, 11], [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
    for peaks in all_hand_peaks:
        peaks = np.array(peaks)
        for ie, e in enumerate(edges):
            x1, y1 = peaks[e[0]]
            x2, y2 = peaks[e[1]]
            x1 = int(x1 * W)
            y1 = int(y1 * H)
            x2 = int(x2 * W)
            y2 = int(y2 * H)
            if x1 > eps and y1 > eps and x2 > eps and y2 > eps:
                cv2.line(canvas, (x1, y1), (x2, y2),
                         matplotlib.colors.hsv_to_rgb([ie / float(len(edges)), 1.0, 1.0]) * 255, thickness=2)
        for i, keyponit in enumerate(peaks):
            x, y = keyponit
            x = int(x * W)
            y = int(y * H)
            if x > eps and y > eps:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def _official_detector_call(candidate, subset, H, W):         # prepare_video_pose.py DWposeDetector.__call__
    candidate = candidate[0][np.newaxis, :, :].copy()
    subset = subset[0][np.newaxis, :].copy()
    nums, keys, locs = candidate.shape
    candidate[..., 0] /= float(W)
    candidate[..., 1] /= float(H)
    un_visible = subset < 0.3
    candidate[un_visible] = -1
    bodyfoot_score = subset[:, :24].copy()
    for i in range(len(bodyfoot_score)):
        for j in range(len(bodyfoot_score[i])):
            if bodyfoot_score[i][j] > 0.3:
                bodyfoot_score[i][j] = int(18 * i + j)
            else:
                bodyfoot_score[i][j] = -1
    if -1 not in bodyfoot_score[:, 18] and -1 not in bodyfoot_score[:, 19]:
        bodyfoot_score[:, 18] = np.array([18.])
    else:
        bodyfoot_score[:, 18] = np.array([-1.])
    if -1 not in bodyfoot_score[:, 21] and -1 not in bodyfoot_score[:, 22]:
        bodyfoot_score[:, 19] = np.array([19.])
    else:
        bodyfoot_score[:, 19] = np.array([-1.])
    bodyfoot_score = bodyfoot_score[:, :20]
    bodyfoot = candidate[:, :24].copy()
    for i in range(nums):
        if -1 not in bodyfoot[i][18] and -1 not in bodyfoot[i][19]:
            bodyfoot[i][18] = (bodyfoot[i][18] + bodyfoot[i][19]) / 2
        else:
            bodyfoot[i][18] = np.array([-1., -1.])
        if -1 not in bodyfoot[i][21] and -1 not in bodyfoot[i][22]:
            bodyfoot[i][19] = (bodyfoot[i][21] + bodyfoot[i][22]) / 2
        else:
            bodyfoot[i][19] = np.array([-1., -1.])
    bodyfoot = bodyfoot[:, :20, :].reshape(nums * 20, locs)
    hands = np.vstack([candidate[:, 92:113], candidate[:, 113:]])
    canvas = np.zeros(shape=(H, W, 3), dtype=np.uint8)
    canvas = _official_draw_body_and_foot(canvas, bodyfoot, bodyfoot_score)
    canvas = _official_draw_handpose(canvas, hands)
    canvas_without_face = copy.deepcopy(canvas)
    # stored with cv2.imencode (BGR) and read back as RGB: channels reversed
    return cv2.imdecode(cv2.imencode(".png", canvas_without_face)[1], cv2.IMREAD_COLOR)[..., ::-1]


def _official_wholebody(keypoints, scores):                                         # dwpose/wholebody.py
    keypoints_info = np.concatenate((keypoints, scores[..., None]), axis=-1)
    neck = np.mean(keypoints_info[:, [5, 6]], axis=1)
    neck[:, 2:4] = np.logical_and(keypoints_info[:, 5, 2:4] > 0.3, keypoints_info[:, 6, 2:4] > 0.3).astype(int)
    new_keypoints_info = np.insert(keypoints_info, 17, neck, axis=1)
    mmpose_idx = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
    openpose_idx = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    new_keypoints_info[:, openpose_idx] = new_keypoints_info[:, mmpose_idx]
    return new_keypoints_info[..., :2], new_keypoints_info[..., 2]


def _keypoints(seed, persons=2):
    r = np.random.default_rng(seed)
    kp = np.stack([r.uniform([4, 4], [W - 4, H - 4], (133, 2)) for _ in range(persons)])
    sc = r.uniform(0.0, 1.0, (persons, 133))
    sc[:, 17:23] = r.choice([0.1, 0.9], (persons, 6))               # feet on/off
    return kp, sc


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_drawing_matches_the_official_code(seed):
    kp133, sc133 = _keypoints(seed)
    kp, sc = _official_wholebody(kp133, sc133)
    ours_kp, ours_sc = skeleton.to_openpose(kp133, sc133)
    np.testing.assert_array_equal(ours_kp, kp)
    np.testing.assert_array_equal(ours_sc, sc)
    want = _official_detector_call(kp, sc, H, W)
    got = skeleton.draw_pose(kp, sc, H, W)
    assert got.shape == (H, W, 3) and got.dtype == np.uint8
    assert (want > 0).any()
    np.testing.assert_array_equal(got, want)                          # pixel-exact


def test_all_hidden_or_no_person_draws_black():
    kp, sc = skeleton.to_openpose(*_keypoints(0, 1))
    assert not skeleton.draw_pose(kp, np.zeros_like(sc), H, W).any()
    assert not skeleton.draw_pose(kp[:0], sc[:0], H, W).any()


# ------------------------------------------------------------------------------------- tiny random ONNX models


def _det_model(path, person: bool):
    """A "YOLOX" whose 8400 x 6 output is a fixed random tensor (+ 0 * the input, so it reads the image); with
    ``person`` one anchor of the stride-8 grid holds a confident person of 40 x 60 pixels (640 space)."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    out = np.concatenate([r.normal(0, 0.3, (1, 8400, 4)), r.uniform(0, 0.05, (1, 8400, 2))], -1).astype(np.float32)
    if person:
        a = 30 * 80 + 20                                             # grid (x 20, y 30) of stride 8
        out[0, a] = [0.5, 0.5, np.log(40 / 8), np.log(60 / 8), 0.95, 0.9]
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["const", "z"], ["output"])]
    g = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8400, 6])],
                          [numpy_helper.from_array(out, "const"), numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return out


def _pose_model(path, h=32, w=24):
    """A random linear "RTMPose": input [1, 3, h, w] -> simcc_x [1, 133, 2w], simcc_y [1, 133, 2h]."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(1)
    wx = r.normal(0, 0.05, (3 * h * w, 133 * 2 * w)).astype(np.float32)
    wy = r.normal(0, 0.05, (3 * h * w, 133 * 2 * h)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("MatMul", ["f", "wx"], ["mx"]), helper.make_node("Reshape", ["mx", "sx"], ["simcc_x"]),
             helper.make_node("MatMul", ["f", "wy"], ["my"]), helper.make_node("Reshape", ["my", "sy"], ["simcc_y"])]
    inits = [numpy_helper.from_array(wx, "wx"), numpy_helper.from_array(wy, "wy"),
             numpy_helper.from_array(np.array([1, 133, 2 * w], np.int64), "sx"),
             numpy_helper.from_array(np.array([1, 133, 2 * h], np.int64), "sy")]
    g = helper.make_graph(nodes, "pose", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])],
                          [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, 133, 2 * w]),
                           helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, 133, 2 * h])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    _det_model(str(d / "yolox_person.onnx"), True)
    _det_model(str(d / "yolox_none.onnx"), False)
    _pose_model(str(d / "dw-ll_ucoco_384.onnx"))
    return d


def test_onnx_wholebody_shapes_and_boxes(models):
    img = np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    wb = Wholebody(str(models / "yolox_person.onnx"), str(models / "dw-ll_ucoco_384.onnx"))
    boxes = wb.boxes(img)
    r = min(640 / 120, 640 / 160)                                   # the letterbox ratio (4.0)
    np.testing.assert_allclose(boxes, [[(164 - 20) / r, (244 - 30) / r, (164 + 20) / r, (244 + 30) / r]], rtol=1e-6)
    kp, sc = wb(img)
    assert kp.shape == (1, 134, 2) and sc.shape == (1, 134) and wb.last_detected == 1
    box = boxes[0]                                                  # keypoints land in the padded person box
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert np.all(np.abs(kp[0, :, 0] - cx) <= 0.8 * (box[3] - box[1])) and np.all(np.abs(kp[0, :, 1] - cy) <= 0.8 * (box[3] - box[1]))
    none = Wholebody(str(models / "yolox_none.onnx"), str(models / "dw-ll_ucoco_384.onnx"))
    assert none.boxes(img).shape == (0, 4)
    kp, sc = none(img)                                              # official fallback: the whole image
    assert kp.shape == (1, 134, 2) and none.last_detected == 0


def test_person_boxes_nms():
    pred = np.zeros((3, 6))
    pred[0] = [100, 100, 40, 60, 0.9, 0.9]
    pred[1] = [102, 101, 40, 60, 0.8, 0.9]                          # overlaps box 0: suppressed
    pred[2] = [300, 300, 20, 20, 0.9, 0.2]                          # person score 0.18 <= 0.3: dropped
    np.testing.assert_allclose(person_boxes(pred, 2.0), [[40, 35, 60, 65]])
    assert yolox_decode(np.zeros((1, 8400, 6)))[0, 80 * 80 + 1, 0] == 16   # grid x 1 of stride 16


def _video(path, n=6, h=40, w=56):
    from svi_jax.data.video import write_video

    frames = np.random.default_rng(3).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, frames, fps=10.0, crf=10)


def test_pose_cli_videos_and_no_person(models, tmp_path, capsys):
    from svi_jax.data.__main__ import main
    from svi_jax.data.video import probe_video

    _video(str(tmp_path / "v" / "dance" / "a.mp4"))
    (tmp_path / "v" / "dance" / "dance.csv").write_text("Filename,Video Description\na.mp4,a dance\n")
    pm = str(models / "dw-ll_ucoco_384.onnx")
    rc = main(["pose", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "o"), "--det",
               str(models / "yolox_person.onnx"), "--pose-model", pm, "--quiet"])
    assert rc == 0
    out = tmp_path / "o" / "dance"
    assert probe_video(str(out / "a.pose.mp4")).num_frames == 6
    info = probe_video(str(out / "a.mp4"))
    assert (info.height, info.width) == (40, 40)                   # landscape -> centre square
    z = np.load(out / "a.keypoints.npz")
    assert z["keypoints"].shape == (6, 134, 2) and list(z["detected"]) == [1] * 6
    assert (out / "dance.csv").is_file()
    # no person in any frame: skipped and counted
    rc = main(["pose", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "o2"), "--det",
               str(models / "yolox_none.onnx"), "--pose-model", pm, "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 1 and "no_person" in printed and "skipped 1" in printed
    assert json.load(open(tmp_path / "o2" / "poses.json"))["skipped"] == {"no_person": 1}
    assert not (tmp_path / "o2" / "dance" / "a.pose.mp4").exists()
    # a missing ONNX file: one clear line
    rc = main(["pose", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "o3"), "--det",
               str(tmp_path / "yolox_l.onnx"), "--pose-model", pm])
    err = capsys.readouterr().err
    assert rc == 2 and "error: the DWPose detector (yolox_l.onnx) file" in err and "does not exist" in err


def test_pose_cli_from_keypoints(tmp_path, capsys):
    from svi_jax.data.__main__ import main
    from svi_jax.video_io import read_mp4

    kp, sc = _keypoints(5, 1)
    kps = np.repeat(kp, 4, 0) + np.arange(4)[:, None, None]         # 4 frames, DWPose (133) order
    scs = np.repeat(sc, 4, 0)
    os.makedirs(tmp_path / "k")
    np.savez(tmp_path / "k" / "a.npz", keypoints=kps, scores=scs, height=H, width=W)
    json.dump({"height": H, "width": W, "frames": [{"keypoints": kps[0].tolist(), "scores": (scs[0] * 0).tolist()}]},
              open(tmp_path / "k" / "hidden.json", "w"))
    rc = main(["pose", "--keypoints", str(tmp_path / "k"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0 and "no_person 1" in capsys.readouterr().out
    got = read_mp4(str(tmp_path / "o" / "a.pose.mp4"))
    assert got.shape == (4, H, W, 3)
    ok, oc = skeleton.to_openpose(kps[:1], scs[:1])
    want = skeleton.draw_pose(ok, oc, H, W)
    assert np.abs(got[0].astype(int) - want).mean() < 3.0            # yuv444 crf 0: near-lossless
