"""SVI-Talk training data: talking-head videos with their audio (official ``prepare_video_audio.py`` +
``train_svi_talk.py`` dataset), built into the project's TFDS dataset like every other video folder.

Build (:func:`build_talk_dataset`, done by the trainer on first use into ``<workdir>/talk_dataset``): the videos of
``config.data.videos`` go through :func:`svi_jax.data.builder.build_dataset` (scan, probe, captions, skip rules)
with one more hook: each kept video's audio track is decoded to 16 kHz mono
(:func:`svi_jax.models.wav2vec2.read_audio`) and encoded once with wav2vec2 into ``[T25, layers, hidden]``
features, stored in the example's ``audio`` field. Videos without an audio track (``no_audio``), silent ones (peak
below 1e-4, ``silent``), shorter than one clip (``too_few_frames``) or that do not decode are skipped and counted in
``summary.json``.

Loading: the Shot loader (:class:`svi_jax.data.loader.ClipLoader`) adds the clip's audio windows
(``audio_first``, ``audio_later``, :func:`svi_jax.data.audio.audio_windows`) whenever an example has audio.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from svi_jax.conditioners import TalkConditioner  # noqa: F401 (moved there; alias)
from svi_jax.data import builder
from svi_jax.data.loader import ClipLoader

log = logging.getLogger("svi_jax.talk_data")

SILENCE_PEAK = 1e-4


def audio_hook(encoder):
    """The builder's ``audio_features`` hook: a video's path -> its wav2vec2 features, or :class:`SkipVideo`."""
    from svi_jax.models.wav2vec2 import read_audio

    def features(path: str) -> np.ndarray:
        try:
            wav = read_audio(path)
        except ValueError as err:
            raise builder.SkipVideo("no_audio", str(err)) from None
        peak = float(np.max(np.abs(wav))) if wav.size else 0.0
        if peak < SILENCE_PEAK:
            raise builder.SkipVideo("silent", f"peak {peak:.1e} < {SILENCE_PEAK:g}")
        return enc_features(encoder, wav)

    return features


def build_talk_dataset(videos: str, out: str, encoder, num_frames: int, captions=None, progress: bool = False,
                       overwrite: bool = False) -> dict:
    """The TFDS dataset of the usable talking-head videos of ``videos`` (with their audio features) in ``out``;
    returns the build summary."""
    return builder.build_dataset(videos, out, captions=captions, min_frames=int(num_frames),
                                 clip_frames=int(num_frames), audio_features=audio_hook(encoder), progress=progress,
                                 overwrite=overwrite)


def enc_features(encoder, wav: np.ndarray) -> np.ndarray:
    return np.asarray(encoder.features(wav), np.float32)


def is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, builder.SUMMARY_FILE))


def drop_audio(key, audio, p: float):
    """Zero each example's audio windows with probability ``p`` (official p 0.1, train_svi_talk.py L969-973)."""
    import jax

    b = audio[0].shape[0]
    keep = (jax.random.uniform(key, (b,)) >= p).astype(audio[0].dtype)
    return tuple(a * keep.reshape((b,) + (1,) * (a.ndim - 1)) for a in audio)


def make_talk_data(config, workdir: str, host_id=None, num_hosts=None) -> ClipLoader:
    """The trainer's data for a MultiTalk config: ``config.data.dataset`` (a built talk dataset) or
    ``config.data.videos`` built into ``<workdir>/talk_dataset`` on first use."""
    d = config.data
    path = d.dataset or os.path.join(workdir, "talk_dataset")
    if not is_built(path):
        if not d.videos:
            raise ValueError("SVI-Talk training needs config.data.videos (talking-head videos with audio) or "
                             "config.data.dataset (a built talk dataset)")
        from svi_jax.encoders import make_audio_encoder

        build_talk_dataset(d.videos, path, make_audio_encoder(config), int(d.num_frames))
    loader = ClipLoader(path, d, host_id=host_id, num_hosts=num_hosts)
    audio = loader.source[0].get("audio", b"")
    if not (audio.item() if isinstance(audio, np.ndarray) else audio):
        raise ValueError(f"the dataset {path} has no audio features (built for Shot/Film?); SVI-Talk needs one built "
                         "from talking-head videos by a Talk config (set config.data.videos instead)")
    return loader
