"""The files of a long-video generation and what ``--resume`` checks: ``OUT.mp4`` (stitched, rewritten atomically
after every clip), ``OUT.json`` (the sidecar), ``OUT.mp4.parts/`` (segments, tails, carried state, ``state.json``),
the input records (file hashes, LoRA files) and the committed resume state.

Used by :func:`svi_jax.sample.generate` (the CLI's file/resume path around
:meth:`svi_jax.long_video.ClipLoop.clips`); it imports none of the samplers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Optional

import numpy as np

from svi_jax import video_io

log = logging.getLogger("svi_jax.sample")

STATE_VERSION = 1


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this generation (missing state, or different settings)."""


# ------------------------------------------------------------------------------------------------ inputs

def lora_records(lora, lora_scale: float = 1.0):
    """The ``--lora PATH[:S]`` list as the settings ``generate`` stores and checks on resume: path, sha256 and
    strength of each file (one LoRA at ``lora_scale``: one record without a strength, as before stacking)."""
    from svi_jax.lora_formats import parse_specs

    recs = []
    for spec in parse_specs(lora, float(lora_scale)):
        lora_file = resolve_lora(spec.path)
        recs.append({"path": os.path.abspath(lora_file),
                     "sha256": file_sha256(os.path.join(lora_file, "config.json") if os.path.isdir(lora_file)
                                           else lora_file), "strength": spec.strength})
    if len(recs) == 1 and recs[0]["strength"] == float(lora_scale):
        recs[0].pop("strength")
    return recs[0] if len(recs) == 1 else recs


def resolve_lora(path: str) -> str:
    """A LoRA file, or a training workdir holding ``lora.safetensors``."""
    if os.path.isdir(path):
        cand = os.path.join(path, "lora.safetensors")
        if not os.path.isfile(cand):
            if _is_adapter_dir(path):                   # SVI-Dance: a converted adapter directory
                return path
            raise FileNotFoundError(f"{path} is a directory without lora.safetensors")
        return cand
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return path


def _is_adapter_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("kind") == "dance_adapter"
    except (OSError, ValueError):
        return False


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ output + resume


class Output:
    """The files of one generation: ``OUT`` (stitched mp4), ``OUT.json`` (sidecar), ``OUT.parts/`` (segments,
    state), ``OUT_clips/`` (each whole clip, with ``--save_clips``)."""

    def __init__(self, out: str):
        if not out.lower().endswith(".mp4"):
            raise ValueError(f"--out must be an .mp4 path, got {out}")
        self.out = os.path.abspath(out)
        self.parts = self.out + ".parts"
        self.sidecar = os.path.splitext(self.out)[0] + ".json"
        self.clips_dir = os.path.splitext(self.out)[0] + "_clips"
        self.state_json = os.path.join(self.parts, "state.json")

    def segment(self, k: int, ext: str = "mp4") -> str:
        return os.path.join(self.parts, f"seg_{k:05d}.{ext}")

    def tail(self, k: int, ext: str = "mp4") -> str:
        return os.path.join(self.parts, f"tail_{k:05d}.{ext}")

    def carry(self, k: int) -> str:
        return os.path.join(self.parts, f"carry_{k:05d}.npz")

    def publish(self, done: int) -> None:
        """``OUT`` <- segments ``0..done-1`` + the last clip's tail (its final ``m`` frames)."""
        parts = [self.segment(k) for k in range(done)] + [self.tail(done - 1)]
        missing = [p for p in parts if not os.path.isfile(p)]
        if missing:
            raise ResumeError(f"missing segment(s) {missing[:3]} in {self.parts}")
        video_io.concat_mp4(parts, self.out)

    def clean(self, done: int) -> list[str]:
        """Remove what a killed run left behind and a resume at clip ``done`` supersedes: temporary files
        (``.NAME.*.tmp.*``), carries other than ``carry_<done>``, tails other than ``tail_<done - 1>`` and segments of
        clips not committed. Returns the names removed."""
        keep_tail, gone = done - 1, []
        for name in sorted(os.listdir(self.parts)):
            m = re.fullmatch(r"(seg|tail|carry)_(\d+)\.\w+", name)
            stale = name.startswith(".") and ".tmp" in name
            if m:
                k = int(m.group(2))
                stale = {"seg": k >= done, "tail": k != keep_tail, "carry": k != done}[m.group(1)]
            if stale:
                os.unlink(os.path.join(self.parts, name))
                gone.append(name)
        return gone

    def read_lossless(self) -> np.ndarray:
        """The stitched frames from the ``--lossless`` copies (uint8 ``[N, H, W, 3]``)."""
        state = json.load(open(self.state_json))
        done = state["next_clip"]
        arrs = [np.load(self.segment(k, "npz"))["frames"] for k in range(done)]
        arrs.append(np.load(self.tail(done - 1, "npz"))["frames"])
        return np.concatenate(arrs, axis=0)


def write_json(path: str, obj) -> None:
    video_io.atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def preflight(out: str, resume: bool = False, overwrite: bool = False) -> bool:
    """Check ``out`` before any work: never clobber a generation or a file unasked. Returns whether to resume
    (``resume`` with nothing to resume starts a new generation)."""
    o = Output(out)
    if not resume and not overwrite:
        if os.path.exists(o.state_json):
            raise ResumeError(f"{o.parts} holds an unfinished or finished generation: pass --resume to continue it "
                              f"or --overwrite to start over")
        if os.path.exists(o.out):
            raise ResumeError(f"{o.out} exists: pass --overwrite to replace it")
    if resume and not os.path.isfile(o.state_json):
        if os.path.exists(o.out) and not overwrite:
            raise ResumeError(f"nothing to resume ({o.state_json} does not exist) and {o.out} exists: pass "
                              f"--overwrite to replace it")
        log.info("nothing to resume in %s: starting", o.parts)
        return False
    return resume


def resolved_attention(sampler) -> str:
    """What the DiT's ``attention`` (``auto``: the platform's fused kernel) runs as here."""
    import jax

    from svi_jax.models.layers import resolve_attention

    if getattr(sampler, "attention", None):           # resolved for the sampler's mesh (svi_jax.sample_mesh)
        return sampler.attention
    cfg = getattr(sampler, "dit_config", None)
    return resolve_attention(cfg.attention if cfg is not None else "auto", jax.default_backend())


def mesh_sizes(sampler) -> Optional[dict]:
    mesh = getattr(sampler, "mesh", None)
    return None if mesh is None else {k: int(v) for k, v in dict(mesh.shape).items()}


def sidecar(o: Output, sampler, done: int, *, fps: float, settings: dict, meta: dict, records: list) -> dict:
    """The sidecar ``OUT.json`` after ``done`` clips (what :func:`svi_jax.sample.generate` returns)."""
    return {"video": o.out, "fps": fps, "num_clips": done, "num_frames": sampler.T, "motion_frames": sampler.m,
            "new_frames_per_clip": sampler.new_frames_per_clip,
            "first_clip_frames": getattr(sampler, "first_clip_frames", sampler.new_frames_per_clip),
            "total_frames": sampler.total_frames(done),
            "height": sampler.H, "width": sampler.W, "settings": settings, "compile_s": meta.get("compile_s"),
            "attention": resolved_attention(sampler), "mesh": mesh_sizes(sampler), "clips": records[:done]}


def read_state(o: Output, settings: dict) -> tuple[int, list, dict, dict]:
    """The committed state of the generation in ``o.parts``: ``(next clip, clip records, meta, carried arrays)``
    (``cond_frames`` and, for latent chaining, ``cond_latents``). :class:`ResumeError` when it is damaged, of
    another version or was made with other ``settings``."""
    try:
        with open(o.state_json) as f:
            st = json.load(f)
    except ValueError as e:                      # torn or edited by hand
        raise ResumeError(f"{o.state_json} is damaged ({e}); pass --overwrite to start the generation over") \
            from None
    if st.get("version") != STATE_VERSION:
        raise ResumeError(f"{o.state_json} has state version {st.get('version')}, expected {STATE_VERSION}")
    diff = _diff_keys(st["settings"], settings)
    if diff:
        raise ResumeError("cannot resume with different settings: " + "; ".join(
            f"{k}: was {st['settings'].get(k)!r}, now {settings.get(k)!r}" for k in diff))
    done = int(st["next_clip"])
    with np.load(o.carry(done)) as z:
        carried = {k: z[k] for k in z.files}
    return done, st["clips"], st.get("meta", {"compile_s": None}), carried


def write_state(o: Output, next_clip: int, settings: dict, meta: dict, records: list) -> None:
    """Replace ``state.json`` atomically: the commit point of clip ``next_clip - 1``."""
    write_json(o.state_json, {"version": STATE_VERSION, "next_clip": next_clip, "settings": settings, "meta": meta,
                               "clips": records})
