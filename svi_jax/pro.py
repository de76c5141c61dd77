"""SVI 2.0 Pro on Wan2.2-A14B: two-expert sampling with a LoRA pair and latent chaining (``--chain pro``).

As the official ``WanVideoSviProPipeline`` (``svi_wan22`` branch, ``diffsynth/pipelines/wan_video_svi_pro.py``) and
its script ``inference_svi_2.0_pro.py``, per clip ``k``:

* conditioning (``WanVideoUnit_ImageEmbedderVAE``, L467-533), in normalised latent space, ``F = 1 + (T - 1)/4``::

      clip 0:   y16 = [VAE(anchor), 0 x (F - 1)]                          (L505-512; the anchor is the input image)
      clip k>0: y16 = [VAE(anchor), prev_latents[-n:], 0 x (F - 1 - n)]   (L513-522; n = num_motion_latent = 1)

  the zeros are latent zeros (not an encoded black video); the mask is 1 on latent frame 0 only (L524-529), so
  ``y = mask (4) ++ y16``. The anchor is the user's image for every clip (script L106 ``anchor=input_image``).
* the previous clip's final *latents* pass on directly (L335 ``prev_last_latent = latents[0]``), never decoded and
  re-encoded; the decoded frames are only for the video.
* sampling: the two experts, high-noise (``dit`` + the high LoRA) while ``t >= boundary * 1000``, then low-noise
  (``dit2`` + the low LoRA) (L226, L293; :mod:`svi_jax.denoise_experts`), Euler at shift 5, 50 steps, CFG
  (script default 5.0; the README's command passes 4), the timestep rounded to bf16 before the model (L299).
* seed ``seed + k * seed_times`` (script: ``clip_idx * 42``); noise from ``jax.random.key(seed_k)`` (the official
  draws with torch's CPU generator: same distribution, not the same numbers).
* stitching (script L125-131): all frames of clip 0, then each later clip without its first ``overlap`` frames
  (script default 4; the README's command uses 5).

How this differs from ``--chain latent`` (:mod:`svi_jax.sample`): that one keeps the Wan2.1 SVI conditioning -- a
VAE encoding of ``[condition frames, reference x (T - m)]`` (Shot) -- and only swaps its first latent(s) for the
previous clip's last latent(s); the padding stays an encoded reference video, CLIP still sees a frame, one DiT runs,
and the stitching drops the last ``m`` frames of each clip. ``--chain pro`` is the official Pro construction above.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.conditioning import build_y, pro_y16  # noqa: F401 (API: svi_jax.pro.pro_y16)
from svi_jax.clip_loop import ChainState, ClipLoop, to_float, to_uint8
from svi_jax.denoise import NEGATIVE_PROMPT

EXPERTS = ("high", "low")
#: The negative prompt of the official Pro script (L99; Wan2.2's ``sample_neg_prompt``).
PRO_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                       "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                       "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
#: SVI 2.0 Pro's defaults (pipeline L223-229, script L226-257).
PRO_DEFAULTS = dict(boundary=0.875, overlap=4, motion_latents=1, cfg_scale=5.0, num_steps=50, shift=5.0,
                    seed_times=42)


# ------------------------------------------------------------------------------------------------ conditioning


def pro_y(anchor_latent, motion_latents, num_frames: int):
    """``y = mask ++ y16`` (mask on latent frame 0 only) for ``num_frames`` pixel frames."""
    return build_y(pro_y16(anchor_latent, motion_latents, 1 + (num_frames - 1) // 4), num_frames)


def stitch(clips: Sequence[np.ndarray], overlap: int) -> np.ndarray:
    """All frames of the first clip, then every later clip without its first ``overlap`` frames."""
    if not clips:
        return np.zeros((0,), np.uint8)
    return np.concatenate([clips[0]] + [c[overlap:] for c in clips[1:]], axis=0)


# ------------------------------------------------------------------------------------------------ models


def load_experts(config, key, names: Sequence[str] = EXPERTS) -> dict:
    """``{name: params}`` of the experts: from ``config.checkpoints.dit`` (a two-expert directory written by
    ``convert/from_torch.py wan22``) or -- path '' (tiny configs) -- a seeded random init per expert (the high
    expert's is the one ``svi_jax.train`` draws for a single DiT)."""
    from svi_jax.model_dirs import CheckpointError, read_meta
    from svi_jax.models.dit import DiT, DiTConfig, init_params
    from svi_jax.models.layers import dtype_of

    cfg = DiTConfig.from_dict(config.model.to_dict())
    path = config.checkpoints.get("dit", "")
    out = {}
    for name in names:
        if name not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {name!r}")
        if path:
            meta = read_meta(path)
            if meta["kind"] != "dit_experts":
                raise CheckpointError(f"config.checkpoints.dit={path} holds a {meta['kind']!r} model; SVI 2.0 Pro "
                                      f"needs both Wan2.2 experts (python convert/from_torch.py wan22 ...)")
            dit = DiT.from_dir(os.path.join(path, meta["config"][name]))
            bad = cfg.architecture_mismatch(dit.config)
            if bad:
                raise CheckpointError(f"config.model.{bad[0]} = {bad[1]!r} but the {name}-noise expert in {path} "
                                      f"has {bad[2]!r}")
            p = dit.params
        else:
            p = init_params(cfg, jax.random.fold_in(key, 1 + 1000 * EXPERTS.index(name)))
        out[name] = jax.tree.map(lambda a: jnp.asarray(a, dtype_of(cfg.param_dtype)), p)
    return out


def parse_lora(spec: Optional[str]) -> tuple[Optional[str], float]:
    """``PATH[:STRENGTH]`` -> ``(path, strength)`` (strength 1.0 when absent)."""
    if not spec:
        return None, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


# ------------------------------------------------------------------------------------------------ sampler


class ProSampler(ClipLoop):
    """The models and compiled functions of SVI 2.0 Pro long-video sampling, one clip at a time; the files, the
    resume state and the timings are :func:`svi_jax.sample.generate`'s (this object has the interface it uses).

    The carried state of clip ``k``: ``cond_latents`` = the previous clip's last ``motion_latents`` latent frames
    (float32, exact: a resumed run continues bit for bit) and ``cond_frames`` = its last decoded frame (the frame
    :func:`generate` holds back as the tail and that opens the next segment)."""

    m = 1                     # frames of each clip held back as the tail (generate's segment/tail layout)
    streams: list = []

    def __init__(self, config, *, lora_high: Optional[str] = None, lora_high_scale: float = 1.0,
                 lora_low: Optional[str] = None, lora_low_scale: float = 1.0, num_steps: int = 50,
                 shift: float = 5.0, cfg_scale=5.0, solver: str = "euler", boundary: float = 0.875,
                 overlap: int = 4, motion_latents: int = 1, negative_prompt: str = NEGATIVE_PROMPT,
                 t_dtype: str = "bfloat16", experts: Optional[dict] = None,
                 on_step: Optional[Callable[[int], None]] = None, cfg_batch: Optional[bool] = None,
                 keep_base: bool = False):
        from svi_jax import encoders
        from svi_jax.models.dit import DiTConfig
        from svi_jax.denoise import resolve_cfg_batch

        d = config.data
        self.config = config
        self.T, self.H, self.W = int(d.num_frames), int(d.height), int(d.width)
        if (self.T - 1) % 4:
            raise ValueError(f"config.data.num_frames must be 1 + 4k, got {self.T}")
        self.F = 1 + (self.T - 1) // 4
        if not 0 <= overlap < self.T:
            raise ValueError(f"overlap must be in 0..{self.T - 1}, got {overlap}")
        if not 1 <= motion_latents <= self.F - 1:
            raise ValueError(f"motion latents must be in 1..{self.F - 1}, got {motion_latents}")
        self.dit_config = DiTConfig.from_dict(dict(config.model.to_dict(), remat_policy="none"))
        if not self.dit_config.is_i2v or self.dit_config.uses_clip:
            raise ValueError("--chain pro needs a Wan2.2-style I2V model without the CLIP branch "
                             "(config.model.model_type='i2v', image_embedding=False; e.g. configs/pro.py)")
        self.overlap, self.n_motion, self.boundary = int(overlap), int(motion_latents), float(boundary)
        self.num_steps, self.shift, self.solver = int(num_steps), float(shift), solver
        self.cfg_scale = cfg_scale if np.ndim(cfg_scale) == 0 else tuple(float(s) for s in cfg_scale)
        self.negative_prompt, self.t_dtype = negative_prompt, t_dtype
        if experts is None:
            experts = load_experts(config, jax.random.key(int(config.train.seed)))
        self.params = self.merge_loras(experts, [(lora_high, lora_high_scale), (lora_low, lora_low_scale)])
        self.codec = encoders.Codec.from_config(config)
        self.t5_cfg, self.t5_params, self.tokenizer = encoders.make_text_encoder(config)
        if self.t5_cfg.dim != self.dit_config.text_dim:
            raise ValueError(f"text encoder width {self.t5_cfg.dim} != DiT text_dim {self.dit_config.text_dim}")
        if self.codec.z_dim != self.dit_config.out_dim:
            raise ValueError(f"VAE z_dim {self.codec.z_dim} != DiT out_dim {self.dit_config.out_dim}")
        self.cfg_batch = resolve_cfg_batch(cfg_batch)
        self.on_step = on_step
        self.base_params = experts if keep_base else None     # per-clip LoRA pairs (--schedule) merge into these
        self.sample_fn = self.make_sample_fn(self.num_steps, cfg_scale, solver)
        self._encode = jax.jit(self.codec.encode)
        self._decode = jax.jit(self.codec.decode)
        self._text = jax.jit(self._text_fn)
        self._text_cache: dict = {}
        self._anchor = None
        self.compile_s: Optional[float] = None

    @staticmethod
    def merge_loras(experts: dict, pair) -> dict:
        """Both experts with their LoRA merged: the high LoRA on dit (high-noise), the low on dit2 (script L44-45).
        ``pair`` = ((high path, strength), (low path, strength)) as tuples or LoRA specs; a falsy path = none."""
        from svi_jax import lora as lora_lib
        from svi_jax.sample_output import resolve_lora

        out = {}
        for name, spec in zip(EXPERTS, pair):
            path, scale = (spec.path, spec.strength) if hasattr(spec, "path") else spec
            p = experts[name]
            out[name] = p if not path else lora_lib.merge_file(p, resolve_lora(path), scale=float(scale))
        return out

    def place(self, params):
        return params                    # the experts run on one device

    @property
    def guided(self) -> bool:
        """CFG on (the negative prompt is encoded): a scale, or a pair of scales, other than 1."""
        c = self.cfg_scale
        return (np.ndim(c) == 0 and float(c) != 1.0) or (np.ndim(c) != 0 and tuple(c) != (1.0, 1.0))

    def make_sample_fn(self, num_steps: int, cfg_scale, solver: str):
        """The compiled two-expert loop for these settings (also per clip, :class:`svi_jax.schedule.ClipRunner`)."""
        from svi_jax.denoise_experts import make_expert_sampler

        return make_expert_sampler(self.dit_config, int(num_steps), self.shift, cfg_scale, solver,
                                   boundary=self.boundary, t_dtype=self.t_dtype, cfg_batch=self.cfg_batch,
                                   on_step=self.on_step)

    # ---------------------------------------------------------------- pieces
    def _text_fn(self, params, ids, mask):
        from svi_jax.models.t5 import UMT5

        return UMT5(self.t5_cfg).apply({"params": params}, ids, mask)

    def encode_text(self, prompt: str):
        if prompt not in self._text_cache:
            ids, mask = self.tokenizer([prompt])
            self._text_cache[prompt] = self._text(self.t5_params, jnp.asarray(ids, jnp.int32),
                                                  jnp.asarray(mask, jnp.int32))
        return self._text_cache[prompt]

    def anchor_latent(self, reference_u8: np.ndarray):
        """``VAE(anchor)``: one latent frame of the reference image alone (cached)."""
        if self._anchor is None:
            self._anchor = self._encode(self.codec.params, jnp.asarray(to_float(reference_u8[None]))[None])
        return self._anchor

    # ---------------------------------------------------------------- the interface of sample.generate
    def initial_state(self, reference_u8: np.ndarray, repeat_first_clip: bool = False) -> ChainState:
        return ChainState(0, np.ascontiguousarray(reference_u8[None]))

    def conditioning(self, state: ChainState, reference_u8: np.ndarray):
        """``(y [1, F, h, w, 4 + C], None)``: no CLIP features in Wan2.2."""
        motion = None if state.cond_latents is None else jnp.asarray(state.cond_latents)[None]
        return pro_y(self.anchor_latent(reference_u8), motion, self.T), None

    def noise(self, y, seed: int):
        return jax.random.normal(jax.random.key(seed), y.shape[:-1] + (self.dit_config.out_dim,), jnp.float32)

    def _sample_args(self, prompt: str, y, seed: int):
        ctx = self.encode_text(prompt)
        neg = self.encode_text(self.negative_prompt) if self.guided else ctx
        return self.params, self.noise(y, seed), ctx, neg, y

    def compile(self, prompt: str, y, clip_fea=None) -> float:
        t0 = time.perf_counter()
        self.sample_fn.lower(*self._sample_args(prompt, y, 0)).compile()
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def sample(self, prompt: str, y, clip_fea, seed: int, clip: int = 0):
        return self.sample_fn(*self._sample_args(prompt, y, seed))

    def decode(self, latents) -> np.ndarray:
        return to_uint8(jax.device_get(self._decode(self.codec.params, latents))[0])

    def next_state(self, state: ChainState, frames_u8: np.ndarray, latents) -> ChainState:
        lat = np.asarray(jax.device_get(latents)[0, -self.n_motion:], np.float32)
        return ChainState(state.clip + 1, np.ascontiguousarray(frames_u8[self.T - 1:]), lat)

    def segment_frames(self, state: ChainState, frames: np.ndarray) -> np.ndarray:
        """Clip 0: its frames but the last; clip k > 0: the previous clip's last frame (held back as its tail),
        then this clip's frames ``overlap .. T - 2``. Segments + the last tail = :func:`stitch` of the clips."""
        if state.clip == 0:
            return frames[: self.T - 1]
        return np.concatenate([state.cond_frames, frames[self.overlap: self.T - 1]], axis=0)

    def rollout(self, reference_u8: np.ndarray, prompts: Sequence[str], seed: int = 0, seed_times: int = 42,
                repeat_first_clip: bool = False) -> np.ndarray:
        """The stitched uint8 video in memory (the same clips and seeds as :func:`svi_jax.sample.generate`)."""
        return stitch([r.frames for r in self.clips(reference_u8, prompts, seed, seed_times)], self.overlap)

    @property
    def new_frames_per_clip(self) -> int:
        return self.T - self.overlap

    @property
    def first_clip_frames(self) -> int:
        return self.T

    def total_frames(self, num_clips: int) -> int:
        return 0 if num_clips <= 0 else self.T + (num_clips - 1) * (self.T - self.overlap)

    def clip_record(self, k: int) -> dict:
        return {}

    def settings(self) -> dict:
        c = self.config
        return {"model": c.model.to_dict(), "checkpoints": c.checkpoints.to_dict(), "encoders": c.encoders.to_dict(),
                "train_seed": int(c.train.seed), "num_frames": self.T, "height": self.H, "width": self.W,
                "chain": "pro", "overlap": self.overlap, "motion_latents": self.n_motion, "boundary": self.boundary,
                "num_steps": self.num_steps, "shift": self.shift, "cfg_scale": self.cfg_scale,
                "cfg_batch": self.cfg_batch, "solver": self.solver, "t_dtype": self.t_dtype,
                "negative_prompt": self.negative_prompt}


# ------------------------------------------------------------------------------------------------ CLI glue


def cli_sampler(config, FLAGS, *, shift: float, cfg_scale, on_step, keep_base: bool = False
                ) -> tuple[ProSampler, dict]:
    """``svi_jax.sample --chain pro``: the sampler and the input records (the LoRA pair's files and hashes)."""
    from svi_jax.sample_output import file_sha256, resolve_lora

    if FLAGS.lora:
        raise ValueError("--chain pro takes the LoRA pair as --lora_high / --lora_low (PATH[:STRENGTH]), not --lora")
    defaults = config.get("pro", {})
    (hp, hs), (lp, ls) = parse_lora(FLAGS.lora_high), parse_lora(FLAGS.lora_low)
    inputs = {}
    for name, p, s in (("high", hp, hs), ("low", lp, ls)):
        rec = None
        if p:
            f = resolve_lora(p)
            rec = {"path": os.path.abspath(f), "strength": s, "sha256": file_sha256(f)}
        inputs[f"lora_{name}"] = rec
    boundary = FLAGS.boundary if FLAGS.boundary is not None else float(defaults.get("boundary", 0.875))
    overlap = FLAGS.overlap if FLAGS.overlap is not None else int(defaults.get("overlap", 4))
    sampler = ProSampler(config, lora_high=hp, lora_high_scale=hs, lora_low=lp, lora_low_scale=ls,
                         num_steps=FLAGS.num_steps, shift=shift, cfg_scale=cfg_scale, solver=FLAGS.solver,
                         boundary=boundary, overlap=overlap, motion_latents=int(defaults.get("motion_latents", 1)),
                         negative_prompt=FLAGS.negative_prompt if FLAGS["negative_prompt"].present
                         else PRO_NEGATIVE_PROMPT, on_step=on_step, cfg_batch=FLAGS.cfg_batch, keep_base=keep_base)
    return sampler, inputs
