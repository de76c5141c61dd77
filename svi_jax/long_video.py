"""Long-video sampling in memory: :class:`LongVideoSampler`, the models and compiled functions of one Wan2.1 SVI
clip (Shot, Film, Dance; SVI-Talk's :class:`svi_jax.talk.TalkSampler` subclasses it), run clip after clip by the
one per-clip loop :meth:`svi_jax.clip_loop.ClipLoop.clips` -- by :meth:`LongVideoSampler.rollout` in memory (the
drift experiment's) and by the CLI's file/resume path :func:`svi_jax.sample.generate`. What the clips are
(conditioning, stitching, seeds) is described in :mod:`svi_jax.sample`.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.clip_loop import (ChainState, ClipLoop, ClipResult, condition_video, load_image,  # noqa: F401 (API)
                               motion_latent_frames, to_float, to_uint8)
from svi_jax.conditioning import build_y
from svi_jax.denoise import NEGATIVE_PROMPT, make_sampler, resolve_cfg_batch

log = logging.getLogger("svi_jax.sample")


class LongVideoSampler(ClipLoop):
    """The models and compiled functions of long-video sampling (one clip at a time; the files are
    :func:`svi_jax.sample.generate`'s).

    Models come from ``config.checkpoints`` or, for tiny configs, the same seeded random init the trainer uses
    (``svi_jax.train.load_frozen_params``, ``svi_jax.encoders``), so a LoRA trained with
    ``python -m svi_jax.train --config configs/tiny.py`` samples on the base it was trained on. The LoRA (our export
    or an official SVI file) is merged once, ``W += lora_scale * B @ A``: a step costs what the base model's does.
    """

    def __init__(self, config, *, lora: Optional[str] = None, lora_scale: float = 1.0, num_steps: int = 50,
                 shift: float = 5.0, cfg_scale: float = 5.0, solver: str = "euler", chain: str = "pixel",
                 motion_frames: Optional[int] = None, pad: Optional[str] = None, negative_prompt: str = NEGATIVE_PROMPT,
                 dit_params=None, dit_config=None, on_step: Optional[Callable[[int], None]] = None,
                 cfg_batch: Optional[bool] = None, streams: Sequence = (), mesh=None, keep_base: bool = False):
        from svi_jax import encoders
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

        self.codec = encoders.Codec.from_config(config)
        self.t5_cfg, self.t5_params, self.tokenizer = encoders.make_text_encoder(config)
        self.clip_cfg, self.clip_params = encoders.make_image_encoder(config)
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
        from svi_jax.sample_output import resolve_lora

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
        if self.mesh is None:
            return fn
        from svi_jax.config_schema import logical_rules

        return sample_mesh.MeshSampler(fn, self.mesh, self.dit_config, self.params, logical_rules(self.config))

    def place(self, params):
        """DiT params where the sampler runs them (split over the mesh, if any)."""
        return params if self.mesh is None else self.sample_fn.place(params)

    # ---------------------------------------------------------------- pure pieces
    def _text_fn(self, params, ids, mask):
        from svi_jax.models.t5 import UMT5

        return UMT5(self.t5_cfg).apply({"params": params}, ids, mask)

    def _clip_fn(self, params, first):
        from svi_jax.models.clip import clip_tokens

        return clip_tokens(self.clip_cfg, params, first)

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
        seeds and stitching as :func:`svi_jax.sample.generate` (which adds the files, the resume state and the
        timings)."""
        parts, frames = [], None
        for r in self.clips(reference_u8, prompts, seed, seed_times, repeat_first_clip=repeat_first_clip):
            frames = r.frames
            parts.append(frames[: self.new_frames_per_clip])
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

