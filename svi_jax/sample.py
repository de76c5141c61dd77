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
* sampling (:mod:`svi_jax.denoise`): Euler at shift 5, 50 steps, CFG 5 with the official negative prompt;
* the stitched video drops the last ``m`` frames of every clip but the final one; 24 fps.

``--chain latent`` (the SVI 2.0 "Pro" idea): clip ``k+1``'s conditioning latents start with the last latent
frame(s) of clip ``k`` itself instead of a VAE re-encoding of decoded frames (see ``docs/sampling.md``).

Output: ``OUT.mp4`` (rewritten atomically after every clip, always playable), ``OUT.json`` (prompts, seeds,
timings, frame layout) and the work directory ``OUT.mp4.parts/`` (one mp4 segment per clip, the state for
``--resume``: next clip index, carried frames / latents, settings).

This module is the command line and its file/resume path (:func:`generate`); the samplers and the one per-clip
loop live in :mod:`svi_jax.long_video` and :mod:`svi_jax.clip_loop`, the files and the resume state in
:mod:`svi_jax.sample_output` (their names are re-exported here).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from svi_jax import video_io
# the API of the long-video sampler, its files and the prompts, as this module has always exported it
from svi_jax.clip_loop import (ChainState, ClipLoop, ClipResult, condition_video, load_image,  # noqa: F401
                               motion_latent_frames, to_float, to_uint8)
from svi_jax.long_video import LongVideoSampler
from svi_jax.prompts import (PromptFileError, clip_seed, load_prompts, parse_prompts,  # noqa: F401 (API)
                             schedule_prompts)
from svi_jax.sample_output import (STATE_VERSION, Output, ResumeError, file_sha256, lora_records,  # noqa: F401
                                   preflight, read_state, resolve_lora, sidecar, write_json, write_state)
from svi_jax.denoise import NEGATIVE_PROMPT  # noqa: F401 (API)

log = logging.getLogger("svi_jax.sample")

DEFAULT_PROMPT_NAME = "prompts"


# ------------------------------------------------------------------------------------------------ output + resume


def generate(sampler: LongVideoSampler, reference_u8: np.ndarray, prompts: Sequence[str], out: str, *,
             seed: int = 0, seed_times: int = 42, inputs: Optional[dict] = None, resume: bool = False,
             overwrite: bool = False, repeat_first_clip: bool = False, save_clips: bool = False,
             lossless: bool = False, fps: float = 24.0, crf: int = 17, progress: bool = True,
             step_bar: Optional["StepBar"] = None, on_clip: Optional[Callable[[int], None]] = None,
             clip_setup: Optional[Callable[[int], tuple[int, dict]]] = None) -> dict:
    """Generate ``len(prompts)`` clips (prompt ``k`` for clip ``k``) into ``out``; returns the sidecar dict.

    The clips come from the sampler's one per-clip loop (:meth:`svi_jax.long_video.ClipLoop.clips`). After every
    clip: the clip's new frames become a segment, the state is committed (``state.json`` replaced atomically; it
    names the carried frames/latents file), then the stitched mp4 and the sidecar JSON are replaced atomically.
    ``resume=True`` continues from the committed state (settings must match; the number of clips and the prompts of
    clips not yet generated may change). ``clip_setup(k) -> (seed, record entries)`` (a per-clip schedule,
    :class:`svi_jax.schedule.ClipRunner`) sets the sampler up for clip ``k`` first.
    """
    from tqdm import tqdm

    o = Output(out)
    num_clips = len(prompts)
    settings = dict(sampler.settings(), seed=int(seed), seed_times=int(seed_times), fps=float(fps), crf=int(crf),
                    repeat_first_clip=bool(repeat_first_clip), **(inputs or {}))
    settings = json.loads(json.dumps(settings))          # as stored (tuples -> lists), for comparison on resume
    records: list[dict] = []
    meta = {"compile_s": None}
    if preflight(out, resume, overwrite):
        done, records, meta, carried = read_state(o, settings)
        changed = [r["clip"] for r in records if r["clip"] < num_clips and r["prompt"] != prompts[r["clip"]]]
        if changed:
            log.warning("the prompts of already generated clip(s) %s differ from the prompt file now; they are "
                        "kept as generated", changed)
        state = ChainState(done, carried["cond_frames"], carried.get("cond_latents"))
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
        write_state(o, 0, settings, meta, [])
    if save_clips:
        os.makedirs(o.clips_dir, exist_ok=True)

    def summary(done: int) -> dict:
        return sidecar(o, sampler, done, fps=fps, settings=settings, meta=meta, records=records)

    clip_bar = tqdm(total=num_clips, initial=min(state.clip, num_clips), desc="clips", unit="clip",
                    disable=not progress, dynamic_ncols=True)
    try:
        for r in sampler.clips(reference_u8, prompts, seed, seed_times, state=state, clip_setup=clip_setup,
                               step_bar=step_bar, precompile=True):
            records = _commit_clip(sampler, o, r, records, settings, meta, fps, crf, lossless, save_clips)
            state = r.state
            write_json(o.sidecar, summary(r.clip + 1))
            clip_bar.update(1)
            clip_bar.set_postfix(s_step=f"{r.timings['s_per_step']:.3g}")
            if on_clip is not None:
                on_clip(r.clip)
    finally:
        clip_bar.close()
        if step_bar is not None:
            step_bar.close()
    done = max(state.clip, 0)
    if done and not os.path.isfile(o.sidecar):
        write_json(o.sidecar, summary(done))
    return summary(min(done, len(records)))


def _commit_clip(sampler, o: Output, r: ClipResult, records: list, settings: dict, meta: dict, fps: float, crf: int,
                 lossless: bool, save_clips: bool) -> list:
    """Write clip ``r.clip``'s files, commit the state after it and republish ``OUT``; returns the clip records."""
    t0, k = time.perf_counter(), r.clip
    if r.compile_s is not None:
        meta["compile_s"] = r.compile_s
    video_io.write_mp4(o.segment(k), r.segment, fps, crf)
    video_io.write_mp4(o.tail(k), r.tail, fps, crf)
    if lossless:
        video_io.atomic_savez(o.segment(k, "npz"), frames=r.segment)
        video_io.atomic_savez(o.tail(k, "npz"), frames=r.tail)
    if save_clips:
        video_io.write_mp4(os.path.join(o.clips_dir, f"clip_{k + 1:04d}.mp4"), r.frames, fps, crf)
    video_io.atomic_savez(o.carry(k + 1), **r.state.arrays())
    start = k * sampler.new_frames_per_clip
    rec = {"clip": k, "prompt": r.prompt, "seed": r.seed, "frames": [start, start + sampler.T],
           "timings": dict(r.timings), **sampler.clip_record(k), **r.record}
    for stream in sampler.streams:
        rec.update(stream.record(k))
    records = records[:k] + [rec]
    write_state(o, k + 1, settings, meta, records)          # the commit point
    o.publish(k + 1)
    rec["timings"]["write_s"] = round(time.perf_counter() - t0, 4)
    for old in ([o.tail(k - 1), o.tail(k - 1, "npz")] if k > 0 else []) + [o.carry(k)]:
        if os.path.exists(old):
            os.unlink(old)
    return records


class StepBar:
    """A tqdm bar for the steps of the clip being sampled, fed from inside the compiled loop (``on_step``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar, self.clip = None, -1

    def start(self, clip: int, total: int, desc: str = "steps"):
        from tqdm import tqdm

        self.close()
        self.clip = clip
        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not self.enabled,
                        dynamic_ncols=True)

    def __call__(self, i):
        if self.bar is not None:
            self.bar.update(1)

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
    bar = StepBar(FLAGS.progress)
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

            sampler, pro_inputs = pro.cli_sampler(config, FLAGS, shift=shift, cfg_scale=cfg_scale, on_step=bar,
                                                  keep_base=plan is not None and plan.needs_base)
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
                        "negative_prompt, seed, steps, cfg_scale, solver, loras [{path, strength}] (--chain pro: lora_high, "
                        "lora_low); omitted fields inherit from these flags; schema in docs/sampling.md. Instead of "
                        "--prompts.")
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
