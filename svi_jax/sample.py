"""Long video generation: clip after clip, each conditioned on the last, following a stream of prompts.

  python -m svi_jax.sample --config configs/shot.py --image ref.png --prompts prompts.txt --out out.mp4 \\
      --lora svi-shot.safetensors [--num_clips N] [--resume]

As the official ``test_svi.py`` / ``SVIVideoPipeline``: per clip ``k``

* prompt ``k`` of the schedule (one per line or a Python list; ``--repeat_prompt``, ``--keep_first_prompt``),
  seed ``seed + k * seed_times`` (official: ``k * 42``), noise ``N(0, 1)`` from ``jax.random.key(seed_k)``;
* conditioning (``encode_images_adaptive``): the condition frames -- the reference image for clip 0, then the last
  ``m`` frames of the previous clip (``m`` = 1 Shot, 5 Film) -- followed by padding (the reference image for
  Shot, ``pad='ref'``; zeros for Film, ``pad='zero'``) to ``num_frames``, VAE-encoded, with the mask marking pixel
  frame 0; CLIP sees the first condition frame. Frames pass through uint8 between clips as in the official code.
* sampling (:mod:`svi_jax.sampler`): Euler at shift 5, 50 steps, CFG 5 with the official negative prompt;
* the stitched video drops the last ``m`` frames of every clip but the final one; 24 fps.

``--chain latent`` (the SVI 2.0 "Pro" idea): clip ``k+1``'s conditioning latents start with the last latent
frame(s) of clip ``k`` itself instead of a VAE re-encoding of decoded frames (see ``docs/sampling.md``).

Output: ``OUT.mp4`` (rewritten atomically after every clip, always playable), ``OUT.json`` (prompts, seeds,
timings, frame layout) and the work directory ``OUT.mp4.parts/`` (one mp4 segment per clip, the state for
``--resume``: next clip index, carried frames / latents, settings).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax import video_io
from svi_jax.conditioning import build_y
from svi_jax.prompts import (PromptFileError, clip_seed, load_prompts, parse_prompts,  # noqa: F401 (API)
                             schedule_prompts)
from svi_jax.sampler import NEGATIVE_PROMPT, make_sampler, resolve_cfg_batch

log = logging.getLogger("svi_jax.sample")

STATE_VERSION = 1
DEFAULT_PROMPT_NAME = "prompts"


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this generation (missing state, or different settings)."""


# ------------------------------------------------------------------------------------------------ images


def to_float(frames_u8) -> np.ndarray:
    """uint8 pixels -> [-1, 1] as DiffSynth's ``preprocess_image`` (``x * 2 / 255 - 1``)."""
    return np.asarray(frames_u8, np.float32) * (2.0 / 255.0) - 1.0


def to_uint8(frames) -> np.ndarray:
    """[-1, 1] -> uint8 as DiffSynth's ``tensor2video`` (``((x + 1) * 127.5).clip(0, 255)`` truncated)."""
    return np.clip((np.asarray(frames, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """An RGB image resized to ``width x height`` (PIL bicubic, as the official ``Image.resize``): uint8 [H, W, 3].
    Any mode (16-bit, palette, CMYK, LA, ...) is converted correctly; see :mod:`svi_jax.images`."""
    from svi_jax import images

    return images.load_image(path, height, width)


def condition_video(reference_u8: np.ndarray, cond_u8: np.ndarray, num_frames: int, pad: str) -> np.ndarray:
    """The VAE input of the conditioning, float [-1, 1] ``[num_frames, H, W, 3]``: the condition frames, then
    ``pad='ref'`` the reference image repeated (Shot) or ``pad='zero'`` zeros (Film) for the remaining frames."""
    cond = to_float(cond_u8)
    m = cond.shape[0]
    if not 1 <= m <= num_frames:
        raise ValueError(f"{m} condition frames for a {num_frames}-frame clip")
    rest = num_frames - m
    if pad == "ref":
        padding = np.broadcast_to(to_float(reference_u8)[None], (rest,) + cond.shape[1:])
    elif pad == "zero":
        padding = np.zeros((rest,) + cond.shape[1:], np.float32)
    else:
        raise ValueError(f"pad must be 'ref' or 'zero', got {pad!r}")
    return np.concatenate([cond, padding], axis=0)


def motion_latent_frames(motion_frames: int, temporal: int = 4) -> int:
    """Latent frames that hold ``m`` leading pixel frames (the first alone, then ``temporal`` per latent)."""
    return 1 + (motion_frames - 1 + temporal - 1) // temporal


# ------------------------------------------------------------------------------------------------ models


@dataclasses.dataclass
class ChainState:
    """What clip ``clip`` is conditioned on: the condition frames (uint8 ``[m', H, W, 3]``) and, for latent
    chaining, the previous clip's last latent frames (``[n, h, w, C]``, ``None`` before the first clip)."""

    clip: int
    cond_frames: np.ndarray
    cond_latents: Optional[np.ndarray] = None

    def arrays(self) -> dict:
        out = {"cond_frames": self.cond_frames}
        if self.cond_latents is not None:
            out["cond_latents"] = self.cond_latents
        return out


class LongVideoSampler:
    """The models and compiled functions of long-video sampling (one clip at a time; I/O is :func:`generate`'s).

    Models come from ``config.checkpoints`` or, for tiny configs, the same seeded random init the trainer uses
    (``svi_jax.train.load_frozen_params``, ``svi_jax.pipeline`` encoders), so a LoRA trained with
    ``python -m svi_jax.train --config configs/tiny.py`` samples on the base it was trained on. The LoRA (our export
    or an official SVI file) is merged once, ``W += lora_scale * B @ A``: a step costs what the base model's does.
    """

    def __init__(self, config, *, lora: Optional[str] = None, lora_scale: float = 1.0, num_steps: int = 50,
                 shift: float = 5.0, cfg_scale: float = 5.0, solver: str = "euler", chain: str = "pixel",
                 motion_frames: Optional[int] = None, pad: Optional[str] = None, negative_prompt: str = NEGATIVE_PROMPT,
                 dit_params=None, dit_config=None, on_step: Optional[Callable[[int], None]] = None,
                 cfg_batch: Optional[bool] = None, streams: Sequence = (), mesh=None, keep_base: bool = False):
        from svi_jax import pipeline
        from svi_jax.models.dit import DiTConfig

        if config.model.model_type != "i2v":
            raise ValueError("long-video sampling chains clips through image conditioning: it needs an I2V model "
                             f"(config.model.model_type = {config.model.model_type!r})")
        if chain not in ("pixel", "latent"):
            raise ValueError(f"chain must be 'pixel' or 'latent', got {chain!r}")
        self.config = config
        d = config.data
        self.T, self.H, self.W = int(d.num_frames), int(d.height), int(d.width)
        if (self.T - 1) % 4:
            raise ValueError(f"config.data.num_frames must be 1 + 4k, got {self.T}")
        self.m = int(motion_frames if motion_frames is not None else d.get("num_motion_frames", 1))
        self.pad = pad or d.get("pad_mode", "ref")
        if not 1 <= self.m < self.T:
            raise ValueError(f"motion frames must be in 1..{self.T - 1}, got {self.m}")
        if self.pad not in ("ref", "zero"):
            raise ValueError(f"pad must be 'ref' or 'zero', got {self.pad!r}")
        self.chain = chain
        self.num_steps, self.shift, self.cfg_scale, self.solver = int(num_steps), float(shift), float(cfg_scale), solver
        self.negative_prompt = negative_prompt
        # extra condition streams (e.g. svi_jax.dance.PoseStream): extra(k) / neg_extra(k) -> WanDiT(extra=...),
        # record(k) -> clip record entries, settings() -> checked on --resume
        self.streams = list(streams)

        mcfg = dict(config.model.to_dict() if dit_config is None else dit_config.to_dict(),
                    remat_policy="none")                            # inference: nothing to rematerialise
        self.dit_config = DiTConfig.from_dict(mcfg)
        if dit_params is None:
            from svi_jax.train import load_frozen_params

            dit_params = load_frozen_params(config, jax.random.key(int(config.train.seed)))
        self.base_params = dit_params if keep_base else None        # per-clip LoRA sets merge into the base
        self.params = self.merge_loras(dit_params, lora, lora_scale) if lora else dit_params

        self.codec = pipeline.Codec.from_config(config)
        self.t5_cfg, self.t5_params, self.tokenizer = pipeline.make_text_encoder(config)
        self.clip_cfg, self.clip_params = pipeline.make_image_encoder(config)
        if self.t5_cfg.dim != self.dit_config.text_dim:
            raise ValueError(f"text encoder width {self.t5_cfg.dim} != DiT text_dim {self.dit_config.text_dim}")
        if self.clip_cfg.dim != self.dit_config.image_dim:
            raise ValueError(f"CLIP width {self.clip_cfg.dim} != DiT image_dim {self.dit_config.image_dim}")
        if self.codec.z_dim != self.dit_config.out_dim:
            raise ValueError(f"VAE z_dim {self.codec.z_dim} != DiT out_dim {self.dit_config.out_dim}")

        # mesh: None / {} = one device; the CLI passes --mesh ('' = every local device, svi_jax.sample_mesh)
        from svi_jax import sample_mesh

        self.mesh, self.dit_config, cfg_batch = (sample_mesh.setup(mesh, self.dit_config, self.cfg_scale, cfg_batch)
                                                 if mesh is not None else (None, self.dit_config, cfg_batch))
        self.attention = sample_mesh.resolved_attention(self.dit_config, self.mesh)
        self.cfg_batch = resolve_cfg_batch(cfg_batch)
        self.on_step = on_step
        self.sample_fn = self.make_sample_fn(self.num_steps, self.cfg_scale, self.solver)
        self.params = self.place(self.params)
        log.info("attention: %s -> %s", self.dit_config.attention, self.attention)
        self._text = jax.jit(self._text_fn)
        self._cond = jax.jit(self._cond_fn)
        self._clip = jax.jit(self._clip_fn)
        self._decode = jax.jit(self.codec.decode)
        self._text_cache: dict[str, jax.Array] = {}
        self._base_latents = None
        self.compile_s: Optional[float] = None

    def merge_loras(self, dit_params, lora, lora_scale: float = 1.0):
        """``dit_params`` with the LoRAs ``lora`` (``PATH[:STRENGTH]`` strings or specs) merged in order."""
        from svi_jax.lora_formats import LoraSpec, merge_stack, parse_specs

        specs = parse_specs(lora, float(lora_scale))
        if self.dit_config.pose_embedding and specs:  # SVI-Dance: the first is the LoRA + dwpose_embedding
            from svi_jax.dance import merge_adapter

            dit_params = merge_adapter(dit_params, resolve_lora(specs[0].path), scale=specs[0].strength)
            specs = specs[1:]
        return merge_stack(dit_params, [LoraSpec(resolve_lora(x.path), x.strength) for x in specs])

    def make_sample_fn(self, num_steps: int, cfg_scale: float, solver: str):
        """The compiled denoising loop for these settings (on the sampler's mesh, if any)."""
        from svi_jax import sample_mesh

        fn = make_sampler(self.dit_config, int(num_steps), self.shift, float(cfg_scale), solver,
                          cfg_batch=self.cfg_batch, on_step=self.on_step, jit=self.mesh is None)
        return fn if self.mesh is None else sample_mesh.MeshSampler(fn, self.mesh, self.dit_config, self.params)

    def place(self, params):
        """DiT params where the sampler runs them (split over the mesh, if any)."""
        return params if self.mesh is None else self.sample_fn.place(params)

    # ---------------------------------------------------------------- pure pieces
    def _text_fn(self, params, ids, mask):
        from svi_jax.models.t5 import UMT5

        return UMT5(self.t5_cfg).apply({"params": params}, ids, mask)

    def _clip_fn(self, params, first):
        from svi_jax.models.clip import CLIPVisionTower, preprocess
        from svi_jax.models.layers import dtype_of

        return CLIPVisionTower(self.clip_cfg).apply(
            {"params": params}, preprocess(first, self.clip_cfg).astype(dtype_of(self.clip_cfg.dtype)))

    def _cond_fn(self, vae_params, clip_params, video, first):
        z = self.codec.encode(vae_params, video)
        return build_y(z, self.T), self._clip_fn(clip_params, first), z

    # ---------------------------------------------------------------- steps of a clip
    def encode_text(self, prompt: str) -> jax.Array:
        """UMT5 features ``[1, L, text_dim]`` (cached per prompt)."""
        if prompt not in self._text_cache:
            ids, mask = self.tokenizer([prompt])
            self._text_cache[prompt] = self._text(self.t5_params, jnp.asarray(ids, jnp.int32),
                                                  jnp.asarray(mask, jnp.int32))
        return self._text_cache[prompt]

    def initial_state(self, reference_u8: np.ndarray, repeat_first_clip: bool = False) -> ChainState:
        cond = np.repeat(reference_u8[None], self.m if repeat_first_clip else 1, axis=0)
        return ChainState(0, cond)

    def conditioning(self, state: ChainState, reference_u8: np.ndarray):
        """``(y [1, F, h, w, 4 + C], clip_fea [1, N, image_dim])`` for the clip ``state`` describes."""
        video = condition_video(reference_u8, state.cond_frames, self.T, self.pad)
        first = to_float(state.cond_frames[:1])
        if self.chain == "latent" and state.cond_latents is not None:
            if self._base_latents is None:       # the padding latents: clip 0's conditioning (reference ++ pad)
                base = condition_video(reference_u8, reference_u8[None], self.T, self.pad)
                _, _, self._base_latents = self._cond(self.codec.params, self.clip_params, jnp.asarray(base)[None],
                                                      jnp.asarray(first))
            lat = jnp.asarray(state.cond_latents)[None]
            z = jnp.concatenate([lat, self._base_latents[:, lat.shape[1]:]], axis=1)
            return build_y(z, self.T), self._clip(self.clip_params, jnp.asarray(first))
        y, clip_fea, _ = self._cond(self.codec.params, self.clip_params, jnp.asarray(video)[None], jnp.asarray(first))
        return y, clip_fea

    def noise(self, y, seed: int) -> jax.Array:
        shape = y.shape[:-1] + (self.dit_config.out_dim,)
        return jax.random.normal(jax.random.key(seed), shape, jnp.float32)

    def _sample_args(self, prompt: str, y, clip_fea, seed: int, clip: int = 0):
        ctx = self.encode_text(prompt)
        neg = self.encode_text(self.negative_prompt) if self.cfg_scale != 1.0 else ctx
        extra, neg_extra = self.extra_conditions(clip)
        return self.params, self.noise(y, seed), ctx, neg, clip_fea, y, None, extra, neg_extra

    def extra_conditions(self, clip: int):
        """``(extra, neg_extra)`` of clip ``clip`` from the condition streams (``(None, None)`` without any)."""
        if not self.streams:
            return None, None
        extra, neg = {}, {}
        for s in self.streams:
            extra.update({k: jnp.asarray(v) for k, v in s.extra(clip).items()})
            neg.update({k: jnp.asarray(v) for k, v in s.neg_extra(clip).items()})
        return extra, neg

    def compile(self, prompt: str, y, clip_fea) -> float:
        """Compile the sampler for these shapes ahead of time (seconds taken); later calls reuse the executable."""
        t0 = time.perf_counter()
        self.sample_fn.lower(*self._sample_args(prompt, y, clip_fea, 0)).compile()
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def sample(self, prompt: str, y, clip_fea, seed: int, clip: int = 0) -> jax.Array:
        """Denoised latents ``[1, F, h, w, C]`` of one clip (``clip``: its index, for the condition streams)."""
        return self.sample_fn(*self._sample_args(prompt, y, clip_fea, seed, clip))

    def decode(self, latents) -> np.ndarray:
        """uint8 frames ``[T, H, W, 3]``."""
        return to_uint8(jax.device_get(self._decode(self.codec.params, latents))[0])

    def next_state(self, state: ChainState, frames_u8: np.ndarray, latents) -> ChainState:
        lat = None
        if self.chain == "latent":
            n = motion_latent_frames(self.m)
            lat = np.asarray(jax.device_get(latents)[0, -n:], np.float32)
        return ChainState(state.clip + 1, np.ascontiguousarray(frames_u8[self.T - self.m:]), lat)

    def rollout(self, reference_u8: np.ndarray, prompts: Sequence[str], seed: int = 0, seed_times: int = 42,
                repeat_first_clip: bool = False) -> np.ndarray:
        """The stitched uint8 video ``[total_frames(len(prompts)), H, W, 3]`` in memory, no files: the same clips,
        seeds and stitching as :func:`generate` (which adds the files, the resume state and the timings)."""
        state = self.initial_state(reference_u8, repeat_first_clip)
        parts = []
        for k, prompt in enumerate(prompts):
            y, clip_fea = self.conditioning(state, reference_u8)
            latents = self.sample(prompt, y, clip_fea, clip_seed(seed, k, seed_times), k)
            frames = self.decode(latents)
            parts.append(frames[: self.new_frames_per_clip])
            state = self.next_state(state, frames, latents)
        if parts:
            parts.append(frames[self.new_frames_per_clip:])
        return np.concatenate(parts) if parts else np.zeros((0, self.H, self.W, 3), np.uint8)

    @property
    def new_frames_per_clip(self) -> int:
        return self.T - self.m

    def segment_frames(self, state: ChainState, frames: np.ndarray) -> np.ndarray:
        """The frames of clip ``state.clip`` that become its segment (the last ``m`` are held back as the tail)."""
        return frames[: self.T - self.m]

    def clip_record(self, k: int) -> dict:
        """Extra per-clip entries of the sidecar / resume state (SVI-Talk: the clip's audio steps)."""
        return {}

    def total_frames(self, num_clips: int) -> int:
        return num_clips * (self.T - self.m) + self.m

    def settings(self) -> dict:
        """What determines the output besides the inputs (checked on ``--resume``)."""
        c = self.config
        return {"model": c.model.to_dict(), "checkpoints": c.checkpoints.to_dict(), "encoders": c.encoders.to_dict(),
                "train_seed": int(c.train.seed), "num_frames": self.T, "height": self.H, "width": self.W,
                "motion_frames": self.m, "pad": self.pad, "chain": self.chain, "num_steps": self.num_steps,
                "shift": self.shift, "cfg_scale": self.cfg_scale, "cfg_batch": self.cfg_batch, "solver": self.solver,
                "negative_prompt": self.negative_prompt,
                **{k: v for s in self.streams for k, v in s.settings().items()}}


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


def _write_json(path: str, obj) -> None:
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


def _resolved_attention(sampler) -> str:
    """What the DiT's ``attention`` (``auto``: the platform's fused kernel) runs as here."""
    from svi_jax.models.layers import resolve_attention

    if getattr(sampler, "attention", None):           # resolved for the sampler's mesh (svi_jax.sample_mesh)
        return sampler.attention
    cfg = getattr(sampler, "dit_config", None)
    return resolve_attention(cfg.attention if cfg is not None else "auto", jax.default_backend())


def _mesh_sizes(sampler) -> Optional[dict]:
    mesh = getattr(sampler, "mesh", None)
    return None if mesh is None else {k: int(v) for k, v in dict(mesh.shape).items()}


def generate(sampler: LongVideoSampler, reference_u8: np.ndarray, prompts: Sequence[str], out: str, *,
             seed: int = 0, seed_times: int = 42, inputs: Optional[dict] = None, resume: bool = False,
             overwrite: bool = False, repeat_first_clip: bool = False, save_clips: bool = False,
             lossless: bool = False, fps: float = 24.0, crf: int = 17, progress: bool = True,
             step_bar: Optional["StepBar"] = None, on_clip: Optional[Callable[[int], None]] = None,
             clip_setup: Optional[Callable[[int], tuple[int, dict]]] = None) -> dict:
    """Generate ``len(prompts)`` clips (prompt ``k`` for clip ``k``) into ``out``; returns the sidecar dict.

    After every clip: the clip's new frames become a segment, the state is committed (``state.json`` replaced
    atomically; it names the carried frames/latents file), then the stitched mp4 and the sidecar JSON are
    replaced atomically. ``resume=True`` continues from the committed state (settings must match; the number of
    clips and the prompts of clips not yet generated may change). ``clip_setup(k) -> (seed, record entries)``
    (a per-clip schedule, :class:`svi_jax.schedule.ClipRunner`) sets the sampler up for clip ``k`` first.
    """
    from tqdm import tqdm

    o = Output(out)
    num_clips = len(prompts)
    settings = dict(sampler.settings(), seed=int(seed), seed_times=int(seed_times), fps=float(fps), crf=int(crf),
                    repeat_first_clip=bool(repeat_first_clip), **(inputs or {}))
    settings = json.loads(json.dumps(settings))          # as stored (tuples -> lists), for comparison on resume
    records: list[dict] = []
    meta = {"compile_s": None}
    resume = preflight(out, resume, overwrite)
    if resume:
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
        records = st["clips"]
        meta = st.get("meta", meta)
        done = int(st["next_clip"])
        changed = [r["clip"] for r in records if r["clip"] < num_clips and r["prompt"] != prompts[r["clip"]]]
        if changed:
            log.warning("the prompts of already generated clip(s) %s differ from the prompt file now; they are "
                        "kept as generated", changed)
        with np.load(o.carry(done)) as z:
            state = ChainState(done, z["cond_frames"], z["cond_latents"] if "cond_latents" in z else None)
        if done:
            o.publish(done)                          # in case the last run died between commit and publish
        removed = o.clean(done)                      # superseded carries/tails/segments, temporary files
        if removed:
            log.info("removed %d superseded file(s) from %s", len(removed), o.parts)
        log.info("resuming at clip %d of %d", done + 1, num_clips)
    else:
        os.makedirs(o.parts, exist_ok=True)
        for f in os.listdir(o.parts):                # --overwrite: a clean work directory
            os.unlink(os.path.join(o.parts, f))
        state = sampler.initial_state(reference_u8, repeat_first_clip)
        video_io.atomic_savez(o.carry(0), **state.arrays())
        _write_json(o.state_json, {"version": STATE_VERSION, "next_clip": 0, "settings": settings, "meta": meta,
                                   "clips": []})
    if save_clips:
        os.makedirs(o.clips_dir, exist_ok=True)

    def sidecar(done: int) -> dict:
        return {"video": o.out, "fps": fps, "num_clips": done, "num_frames": sampler.T, "motion_frames": sampler.m,
                "new_frames_per_clip": sampler.new_frames_per_clip,
                "first_clip_frames": getattr(sampler, "first_clip_frames", sampler.new_frames_per_clip),
                "total_frames": sampler.total_frames(done),
                "height": sampler.H, "width": sampler.W, "settings": settings, "compile_s": meta.get("compile_s"),
                "attention": _resolved_attention(sampler), "mesh": _mesh_sizes(sampler), "clips": records[:done]}

    clip_bar = tqdm(total=num_clips, initial=min(state.clip, num_clips), desc="clips", unit="clip",
                    disable=not progress, dynamic_ncols=True)
    try:
        for k in range(state.clip, num_clips):
            prompt, s, extra = prompts[k], clip_seed(seed, k, seed_times), {}
            t0 = time.perf_counter()
            if clip_setup is not None:
                s, extra = clip_setup(k)
            y, clip_fea = sampler.conditioning(state, reference_u8)
            jax.block_until_ready(y)
            t1 = time.perf_counter()
            if sampler.compile_s is None:            # compile once, timed apart from the steps
                meta["compile_s"] = round(sampler.compile(prompt, y, clip_fea), 3)
                t1 = time.perf_counter()
            if step_bar is not None:
                step_bar.start(k, sampler.num_steps, desc=f"clip {k + 1} steps")
            latents = sampler.sample(prompt, y, clip_fea, s, k)
            jax.block_until_ready(latents)
            if step_bar is not None:
                step_bar.close()
            t2 = time.perf_counter()
            frames = sampler.decode(latents)
            t3 = time.perf_counter()
            new = sampler.segment_frames(state, frames)
            video_io.write_mp4(o.segment(k), new, fps, crf)
            video_io.write_mp4(o.tail(k), frames[sampler.T - sampler.m:], fps, crf)
            if lossless:
                video_io.atomic_savez(o.segment(k, "npz"), frames=new)
                video_io.atomic_savez(o.tail(k, "npz"), frames=frames[sampler.T - sampler.m:])
            if save_clips:
                video_io.write_mp4(os.path.join(o.clips_dir, f"clip_{k + 1:04d}.mp4"), frames, fps, crf)
            state = sampler.next_state(state, frames, latents)
            video_io.atomic_savez(o.carry(k + 1), **state.arrays())
            start = k * sampler.new_frames_per_clip
            rec = {"clip": k, "prompt": prompt, "seed": s, "frames": [start, start + sampler.T],
                   "timings": {"condition_s": round(t1 - t0, 4), "sample_s": round(t2 - t1, 4),
                               "s_per_step": round((t2 - t1) / sampler.num_steps, 5),
                               "decode_s": round(t3 - t2, 4)}, **sampler.clip_record(k), **extra}
            for stream in sampler.streams:
                rec.update(stream.record(k))
            records = records[:k] + [rec]
            _write_json(o.state_json, {"version": STATE_VERSION, "next_clip": k + 1, "settings": settings,
                                       "meta": meta, "clips": records})          # the commit point
            o.publish(k + 1)
            rec["timings"]["write_s"] = round(time.perf_counter() - t3, 4)
            _write_json(o.sidecar, sidecar(k + 1))
            for old in ([o.tail(k - 1), o.tail(k - 1, "npz")] if k > 0 else []) + [o.carry(k)]:
                if os.path.exists(old):
                    os.unlink(old)
            clip_bar.update(1)
            clip_bar.set_postfix(s_step=f"{(t2 - t1) / sampler.num_steps:.3g}")
            if on_clip is not None:
                on_clip(k)
    finally:
        clip_bar.close()
        if step_bar is not None:
            step_bar.close()
    done = max(state.clip, 0)
    if done and not os.path.isfile(o.sidecar):
        _write_json(o.sidecar, sidecar(done))
    return sidecar(min(done, len(records)))


class StepBar:
    """A tqdm bar for the steps of the clip being sampled, fed from inside the compiled loop (``on_step``).

    ``pause_at=(clip, step)`` (tests only): at that step, write ``pause_file`` and sleep, so a test can kill the
    process in the middle of a clip."""

    def __init__(self, enabled: bool = True, pause_at: Optional[tuple[int, int]] = None,
                 pause_file: Optional[str] = None):
        self.enabled, self.pause_at, self.pause_file = enabled, pause_at, pause_file
        self.bar, self.clip = None, -1

    def start(self, clip: int, total: int, desc: str = "steps"):
        from tqdm import tqdm

        self.close()
        self.clip = clip
        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not self.enabled,
                        dynamic_ncols=True)

    def __call__(self, i):
        i = int(i)
        if self.bar is not None:
            self.bar.update(1)
        if self.pause_at is not None and (self.clip, i) == tuple(self.pause_at):
            if self.pause_file:
                with open(self.pause_file, "w") as f:
                    f.write(f"{self.clip}:{i}\n")
            time.sleep(3600)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------------ CLI


def main(argv) -> int:
    from absl import flags

    from svi_jax.logs import quiet_logs

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    config = FLAGS.config
    defaults = config.get("sample", {})          # per-variant defaults of flags not given (e.g. Dance: CFG 2, 25 fps)
    cfg_scale = FLAGS.cfg_scale if FLAGS["cfg_scale"].present else float(defaults.get("cfg_scale", FLAGS.cfg_scale))
    plan = None                                  # --schedule: per-clip settings (svi_jax.schedule)
    try:
        if FLAGS.schedule:
            from svi_jax import schedule as schedule_lib

            prompts = (plan := schedule_lib.from_flags(FLAGS, config, cfg_scale)).prompts
        elif FLAGS.prompt is not None and FLAGS.prompts:
            raise PromptFileError("give either --prompts FILE or --prompt TEXT, not both")
        elif FLAGS.prompt is not None:
            if not FLAGS.prompt.strip():
                raise PromptFileError("--prompt is empty (as an empty item of a prompt file is): give a prompt")
            prompts = [FLAGS.prompt]
        elif FLAGS.prompts:
            prompts = load_prompts(FLAGS.prompts)
        else:
            raise PromptFileError("give --prompts FILE, --prompt TEXT or --schedule FILE")
        schedule = plan.prompts if plan else schedule_prompts(prompts, FLAGS.num_clips, FLAGS.repeat_prompt,
                                                              FLAGS.keep_first_prompt, FLAGS.cycle_prompts,
                                                              FLAGS.prompt_prefix)
        from svi_jax import output_size

        size = output_size.choose(config, FLAGS.image, FLAGS.height, FLAGS.width, FLAGS.max_width)
        config.data.height, config.data.width = size.height, size.width
        print(size.describe(), file=sys.stderr)
        reference = load_image(FLAGS.image, size.height, size.width)
        streams, stream_inputs = condition_streams(config, FLAGS)
        talk = None
        if config.model.get("multitalk", False):     # SVI-Talk: audio features, clips from the audio length
            from svi_jax.talk import TalkRun

            talk = TalkRun(FLAGS, config, prompts)
            schedule = talk.schedule
    except (PromptFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pause = os.environ.get("SVI_SAMPLE_PAUSE_AT")               # tests: "clip:step"
    bar = StepBar(FLAGS.progress, tuple(int(v) for v in pause.split(":")) if pause else None,
                  FLAGS.out + ".paused" if pause else None)
    inputs = {"image_sha256": file_sha256(FLAGS.image), "lora": None, "lora_scale": float(FLAGS.lora_scale),
              "size": size.record(),
              **stream_inputs, **(talk.inputs if talk else {})}
    fps = FLAGS.fps if FLAGS["fps"].present else float(defaults.get("fps", FLAGS.fps))
    shift = FLAGS.shift if FLAGS.shift is not None else float(config.erft.shift)   # the shift it was trained at
    try:
        preflight(FLAGS.out, FLAGS.resume, FLAGS.overwrite)
        if plan is not None or FLAGS.resume:
            from svi_jax.schedule import check_resume

            if FLAGS.resume:
                check_resume(FLAGS.out, plan)
            inputs.update(plan.inputs(file_sha256) if plan else {})
        if FLAGS.lora:
            inputs["lora"] = lora_records(FLAGS.lora, float(FLAGS.lora_scale))
        if talk is not None:
            sampler = talk.sampler(bar, shift=shift)
        elif FLAGS.chain == "pro":                     # SVI 2.0 Pro on Wan2.2-A14B: two experts, a LoRA pair
            from svi_jax import pro

            sampler, pro_inputs = pro.cli_sampler(config, FLAGS, shift=shift, cfg_scale=cfg_scale, on_step=bar)
            inputs.update(pro_inputs)
        else:
            sampler = LongVideoSampler(config, lora=FLAGS.lora, lora_scale=FLAGS.lora_scale,
                                       num_steps=FLAGS.num_steps, shift=shift, cfg_scale=cfg_scale,
                                       solver=FLAGS.solver, chain=FLAGS.chain, motion_frames=FLAGS.motion_frames,
                                       pad=FLAGS.pad, negative_prompt=FLAGS.negative_prompt, on_step=bar,
                                       cfg_batch=FLAGS.cfg_batch, streams=streams, mesh=FLAGS.mesh,
                                       keep_base=plan is not None and plan.needs_base)
        from svi_jax.prompt_checks import warn_long_prompts

        warn_long_prompts(sampler.tokenizer, schedule)
        summary = generate(sampler, reference, schedule, FLAGS.out, seed=FLAGS.seed, seed_times=FLAGS.seed_times,
                           inputs=inputs, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                           repeat_first_clip=FLAGS.repeat_first_clip, save_clips=FLAGS.save_clips,
                           lossless=FLAGS.lossless, fps=talk.fps if talk else fps, crf=FLAGS.crf,
                           progress=FLAGS.progress, step_bar=bar, on_clip=talk.on_clip if talk else None,
                           clip_setup=plan.runner(sampler) if plan else None)
        if talk is not None:
            talk.finish()
    except (ResumeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"video": summary["video"], "clips": summary["num_clips"], "height": size.height,
                      "width": size.width,
                      "frames": summary["total_frames"], "compile_s": summary["compile_s"]}))
    return 0


def condition_streams(config, FLAGS) -> tuple[list, dict]:
    """The extra condition streams the model config asks for, and their input records (SVI-Dance: the pose)."""
    from svi_jax.dance import cli_streams

    return cli_streams(config, pose=FLAGS.pose, pose_dir=FLAGS.pose_dir, lora=FLAGS.lora,
                       motion_frames=FLAGS.motion_frames)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Model/data config, e.g. configs/shot.py (SVI-Shot: 1 motion frame, reference padding), "
        "configs/film.py (5 motion frames, zero padding), configs/tiny.py (random tiny models, CPU). Models come "
        "from config.checkpoints.{dit,vae,t5,clip,tokenizer} (e.g. --config.checkpoints.dit=ckpt/dit); clip size "
        "from config.data.{num_frames,height,width}.", lock_config=True)
    flags.DEFINE_string("image", None, "Reference image (first frame; Shot's padding anchor; EXIF orientation "
                        "applied). Resized to the output size (printed; stored in OUT.json).")
    flags.DEFINE_string("prompts", None, "Prompt file: a Python-style list (prompts = [\"...\", ...]) or one prompt "
                        "per line ('#' comment lines and blank lines skipped). UTF-8.")
    flags.DEFINE_string("prompt", None, "A single prompt instead of --prompts (with --schedule: the prompt of clips "
                        "that set none).")
    flags.DEFINE_string("schedule", None, "Per-clip schedule, JSON Lines or YAML, one record per clip: prompt, "
                        "negative_prompt, seed, steps, cfg_scale, solver, loras [{path, strength}] (omitted fields "
                        "inherit from these flags; schema in docs/sampling.md). Instead of --prompts.")
    flags.DEFINE_string("audio", None, "SVI-Talk (configs/talk.py): the speech (wav/mp3/flac/m4a, or a video's audio "
                        "track). The number of clips follows its length (unless --num_clips); it is muxed into --out.")
    flags.DEFINE_float("cfg_scale_audio", 5.0, "SVI-Talk audio guidance scale (official 5; the text scale is "
                       "--cfg_scale, default 2 for Talk).")
    flags.DEFINE_string("out", None, "Output .mp4. Also written: OUT.json (prompts, seeds, timings), OUT.mp4.parts/ "
                        "(segments and resume state).")
    flags.DEFINE_integer("num_clips", 0, "Clips to generate; 0 = one per scheduled prompt (prompts x "
                         "--repeat_prompt). Capped at the schedule's length unless --cycle_prompts or "
                         "--keep_first_prompt.")
    flags.DEFINE_integer("repeat_prompt", 1, "Use each prompt for this many consecutive clips.")
    flags.DEFINE_bool("keep_first_prompt", False, "Use the first prompt for every clip (needs --num_clips).")
    flags.DEFINE_bool("cycle_prompts", False, "Wrap around the prompt list when --num_clips exceeds it.")
    flags.DEFINE_string("prompt_prefix", "", "Text put before every prompt as 'PREFIX, prompt'.")
    flags.DEFINE_string("negative_prompt", NEGATIVE_PROMPT, "Negative prompt of classifier-free guidance "
                        "(default: the official SVI one).")
    flags.DEFINE_multi_string("lora", None, "LoRA to merge before sampling, PATH[:STRENGTH], repeatable (merged in "
                              "order, W += s * B @ A x alpha/rank where the file has an alpha): an official SVI file, "
                              "our export, a training workdir holding lora.safetensors, a ComfyUI/kohya or diffusers "
                              "LoRA (see docs/sampling.md).")
    flags.DEFINE_float("lora_scale", 1.0, "Strength s of every --lora given without :STRENGTH (official 1.0).")
    flags.DEFINE_integer("height", None, "Output height (with --width; multiple of 16 for Wan). Default: from the "
                         "reference's aspect ratio as the official test_svi.py (see --max_width).")
    flags.DEFINE_integer("width", None, "Output width (with --height).")
    flags.DEFINE_integer("max_width", None, "Without --height/--width: width = min(reference width, max_width), "
                         "height by the aspect ratio, both floored to the model's multiple (default "
                         "config.sample.max_width, else config.data.width: 832 Shot/Film).")
    flags.DEFINE_integer("seed", 0, "Base seed; clip k uses seed + k * seed_times.")
    flags.DEFINE_integer("seed_times", 42, "Seed stride between clips (official default 42).")
    flags.DEFINE_float("cfg_scale", 5.0, "Text classifier-free guidance scale; 1 = conditional pass only.")
    flags.DEFINE_bool("cfg_batch", None, "--cfg_batch: run the conditional and unconditional passes as one batch-2 "
                      "forward (the usual win on GPU/TPU); --nocfg_batch: two forwards (same result; measured 5-13% "
                      "faster on CPU, see docs/benchmarks.md). Default: two forwards on CPU, batched elsewhere.")
    flags.DEFINE_string("mesh", "", "Devices to sample on: '' (default) = every local device (CFG's two branches "
                        "over data=2, the clip's tokens over context, DiT weights sharded; docs/sampling.md); "
                        "'1' = one device; or axis=size,... e.g. data=2,context=4.")
    flags.DEFINE_integer("num_steps", 50, "Denoising steps per clip.")
    flags.DEFINE_float("shift", None, "Flow-matching sigma shift (default: config.erft.shift, the shift the model "
                       "was trained at: 5 for Wan/SVI, 1 for the tiny configs).")
    flags.DEFINE_enum("solver", "euler", ["euler", "unipc"], "euler: the official DiffSynth sampler; unipc: Wan's "
                      "UniPC multistep (order 2) solver.")
    flags.DEFINE_enum("chain", "pixel", ["pixel", "latent", "pro"], "pixel: the official chaining (decode, "
                      "re-encode the last frames); latent: carry the last latent frame(s) forward into the Wan2.1 "
                      "conditioning (see docs/sampling.md); pro: SVI 2.0 Pro on Wan2.2-A14B (two experts, y = "
                      "[anchor latent, previous clip's last latent, zeros], see docs/wan22.md).")
    flags.DEFINE_string("lora_high", None, "--chain pro: the high-noise expert's LoRA, PATH[:STRENGTH] (default "
                        "strength 1).")
    flags.DEFINE_string("lora_low", None, "--chain pro: the low-noise expert's LoRA, PATH[:STRENGTH].")
    flags.DEFINE_float("boundary", None, "--chain pro: the high-noise expert runs while t >= boundary * 1000 "
                       "(default config.pro.boundary: SVI Pro's 0.875; Wan2.2's own I2V: 0.9).")
    flags.DEFINE_integer("overlap", None, "--chain pro: frames dropped from the start of each later clip (default "
                         "config.pro.overlap: 4 as the official script; its README's command uses 5).")
    flags.DEFINE_integer("motion_frames", None, "Frames carried to the next clip (default: "
                         "config.data.num_motion_frames; 1 Shot, 5 Film).")
    flags.DEFINE_enum("pad", None, ["ref", "zero"], "Conditioning padding (default: config.data.pad_mode): ref = "
                      "the reference image (Shot), zero = zeros (Film).")
    flags.DEFINE_bool("repeat_first_clip", False, "Condition the first clip on the reference image repeated "
                      "motion_frames times (official --repeat_first_clip).")
    flags.DEFINE_string("pose", None, "SVI-Dance: pose (skeleton) video driving the dancer; windows continue clip to "
                        "clip and loop when it ends (python -m svi_jax.data pose makes one from a dance video).")
    flags.DEFINE_string("pose_dir", None, "SVI-Dance: a directory of pose images (sorted by name) instead of --pose.")
    flags.DEFINE_bool("resume", False, "Continue the generation in OUT.mp4.parts/ (same settings; --num_clips and "
                      "the prompts of clips not generated yet may change); starts one if there is none, so a job "
                      "can always be (re)launched with --resume.")
    flags.DEFINE_bool("overwrite", False, "Start over even if OUT.mp4.parts/ holds a generation.")
    flags.DEFINE_bool("save_clips", False, "Also write every whole clip (all num_frames frames) to OUT_clips/.")
    flags.DEFINE_bool("lossless", False, "Also keep every segment's frames as .npz in OUT.mp4.parts/.")
    flags.DEFINE_float("fps", 24.0, "Frame rate of the mp4 (official: 24).")
    flags.DEFINE_integer("crf", 17, "x264 quality (lower = better; 17 is visually near-lossless).")
    flags.DEFINE_bool("progress", True, "Progress bars (clips, and steps within a clip).")
    flags.mark_flags_as_required(["config", "image", "out"])


if __name__ == "__main__":
    from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1

    cli.absl_run(main, _define_flags)
