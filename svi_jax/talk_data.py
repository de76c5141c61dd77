"""SVI-Talk training data: talking-head videos with their audio (official ``prepare_video_audio.py`` +
``train_svi_talk.py`` dataset).

Build (:func:`build_talk_dataset`, done by the trainer on first use into ``<workdir>/talk_dataset``): every video of
``config.data.videos`` (found and captioned by :func:`svi_jax.data.scan.scan_folder`) is probed, its audio track
decoded to 16 kHz mono (:func:`svi_jax.models.wav2vec2.read_audio`) and encoded once with wav2vec2 into
``[T25, layers, hidden]`` features (``<n>.audio.npy``); ``index.json`` lists the usable videos. Videos that do not
decode, have no audio track, are silent (peak below 1e-4) or shorter than one clip are skipped and counted in
``summary.json``. The frames stay in the source files and are decoded per clip as the Shot loader does.

Loading (:class:`TalkClipLoader`): Shot's clip sampling (window, crop, reference padding frame, condition frames;
:mod:`svi_jax.data.sampling`) plus the clip's audio windows ``audio_windows(features, start_step, T)`` with
``start_step`` the window's first frame on the 25 steps/s audio timeline (official: the frame index, the videos
being 25 fps).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

from svi_jax.data import sampling
from svi_jax.data.loader import BatchIterator
from svi_jax.data.video import VideoError, decode_frames, probe_video

log = logging.getLogger("svi_jax.talk_data")

SILENCE_PEAK = 1e-4


def build_talk_dataset(videos: str, out: str, encoder, num_frames: int, captions: Optional[str] = None) -> dict:
    """Index + audio features of the usable videos of ``videos`` into ``out``; returns the summary."""
    from svi_jax.data.scan import scan_folder
    from svi_jax.models.wav2vec2 import read_audio

    scan = scan_folder(videos, captions)
    os.makedirs(out, exist_ok=True)
    counts = {"videos": len(scan.entries), "usable": 0, "skipped_bad_video": 0, "skipped_no_audio": 0,
              "skipped_silent": 0, "skipped_short": 0, "skipped_scan": 0}
    index = []
    for e in scan.entries:
        if e.skip is not None:
            counts["skipped_scan"] += 1
            continue
        try:
            info = probe_video(e.path)
        except VideoError as err:
            counts["skipped_bad_video"] += 1
            log.warning("skipping %s: %s", e.path, err)
            continue
        if info.num_frames < num_frames:
            counts["skipped_short"] += 1
            continue
        try:
            wav = read_audio(e.path)
        except ValueError as err:
            counts["skipped_no_audio"] += 1
            log.warning("skipping %s: %s", e.path, err)
            continue
        if float(np.max(np.abs(wav))) < SILENCE_PEAK:
            counts["skipped_silent"] += 1
            continue
        feats = enc_features(encoder, wav)
        name = f"{len(index):06d}.audio.npy"
        np.save(os.path.join(out, name), feats)
        index.append({"video": e.path, "key": e.key, "caption": e.caption or "", "num_frames": info.num_frames,
                      "height": info.height, "width": info.width, "fps": info.fps, "audio": name,
                      "audio_steps": int(feats.shape[0])})
        counts["usable"] += 1
    if not index:
        raise ValueError(f"no usable talking-head video in {videos}: {counts}")
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(counts, f, indent=1)
    log.info("talk dataset %s: %s", out, counts)
    return counts


def enc_features(encoder, wav: np.ndarray) -> np.ndarray:
    return np.asarray(encoder.features(wav), np.float32)


def is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "index.json")) and os.path.isfile(os.path.join(path, "summary.json"))


class TalkClipLoader(BatchIterator):
    """Batches of Shot's clip layout (video, cond, first_frame, num_cond, caption) plus ``audio_first``
    ``[B, 1, 5, L, C]`` and ``audio_later`` ``[B, F-1, 8, L, C]``."""

    kind = "talk"

    def __init__(self, path: str, config, *, host_id: Optional[int] = None, num_hosts: Optional[int] = None):
        from svi_jax.data import config as config_lib

        config_lib.validate(config)
        self.config, self.path = config, path
        with open(os.path.join(path, "index.json")) as f:
            self.index = json.load(f)
        self._feats: dict[int, np.ndarray] = {}
        super().__init__(len(self.index), batch_size=config.batch_size, seed=config.seed, host_id=host_id,
                         num_hosts=num_hosts, shuffle=config.shuffle, num_workers=config.num_workers,
                         prefetch=config.prefetch)

    def features(self, i: int) -> np.ndarray:
        with self._lock:
            if i not in self._feats:
                self._feats[i] = np.load(os.path.join(self.path, self.index[i]["audio"]), mmap_mode="r")
            return self._feats[i]

    def load(self, epoch: int, index: int) -> dict:
        from svi_jax.talk import audio_windows

        cfg, rec = self.config, self.index[index]
        rng = np.random.default_rng([cfg.seed, epoch, index])
        plan = sampling.plan_clip(int(rec["num_frames"]), int(rec["height"]), int(rec["width"]), cfg, rng)
        frames = decode_frames(rec["video"], start=plan.start, count=plan.num_real, stride=plan.stride,
                               crop=plan.crop, size=(cfg.height, cfg.width), fps=float(rec["fps"]), seek=False,
                               threads=cfg.decode_threads)
        ex = sampling.assemble(frames, plan, rec["caption"])
        start = int(round(plan.start * 25.0 / float(rec["fps"]))) if rec["fps"] else plan.start
        first, later = audio_windows(np.asarray(self.features(index)), start, cfg.num_frames)
        ex["audio_first"], ex["audio_later"] = first.astype(np.float32), later.astype(np.float32)
        return ex


class TalkConditioner:
    """:class:`svi_jax.pipeline.PixelConditioner` plus the audio windows of the batch (``inputs['audio']``)."""

    def __init__(self, base):
        self.base = base
        self.params = base.params

    def prepare(self, params, batch, key):
        out = self.base.prepare(params, batch, key)
        out["audio"] = (batch["audio_first"], batch["audio_later"])
        return out

    def device_batch(self, batch: dict) -> dict:
        import jax.numpy as jnp

        out = self.base.device_batch(batch)
        out["audio_first"] = jnp.asarray(batch["audio_first"], jnp.float32)
        out["audio_later"] = jnp.asarray(batch["audio_later"], jnp.float32)
        return out


def drop_audio(key, audio, p: float):
    """Zero each example's audio windows with probability ``p`` (official p 0.1, train_svi_talk.py L969-973)."""
    import jax

    b = audio[0].shape[0]
    keep = (jax.random.uniform(key, (b,)) >= p).astype(audio[0].dtype)
    return tuple(a * keep.reshape((b,) + (1,) * (a.ndim - 1)) for a in audio)


def make_talk_data(config, workdir: str, host_id=None, num_hosts=None) -> TalkClipLoader:
    """The trainer's data for a MultiTalk config: ``config.data.dataset`` (a built talk dataset) or
    ``config.data.videos`` built into ``<workdir>/talk_dataset`` on first use."""
    d = config.data
    path = d.dataset or os.path.join(workdir, "talk_dataset")
    if not is_built(path):
        if not d.videos:
            raise ValueError("SVI-Talk training needs config.data.videos (talking-head videos with audio) or "
                             "config.data.dataset (a built talk dataset)")
        from svi_jax.talk import make_audio_encoder

        build_talk_dataset(d.videos, path, make_audio_encoder(config), int(d.num_frames))
    return TalkClipLoader(path, d, host_id=host_id, num_hosts=num_hosts)
