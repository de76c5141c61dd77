"""The live web demo: ``python -m svi_jax.demo --config CONFIG [--lora PATH[:S] ...] [--host 127.0.0.1] [--port 8000]``.

Serves a page at ``http://HOST:PORT/``: upload a reference image, paste a prompt stream (one prompt per line, one
line per clip), press Generate and watch the clips arrive (the growing mp4, a thumbnail and the timings of each
clip), stop and resume. The models are loaded once, in the background (the page says when they are ready); the
sampling settings (steps, CFG, shift, solver, chaining) are this command's flags, as for ``python -m
svi_jax.sample``. Jobs are kept under ``--workdir`` (``jobs/ID/out.mp4`` + the sampler's ``out.json`` and resume
state) and listed again, resumable, when the server restarts. See docs/demo.md.
"""
from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger("svi_jax.demo")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    from svi_jax.denoise import NEGATIVE_PROMPT

    config_flags.DEFINE_config_file("config", None, "Model/data config, as for python -m svi_jax.sample (e.g. "
                                    "configs/shot.py, configs/tiny.py); --config.a.b=value overrides a field.",
                                    lock_config=True)
    flags.DEFINE_multi_string("lora", None, "LoRA merged before sampling, PATH[:STRENGTH], repeatable (stacked in "
                              "order), any format python -m svi_jax.sample --lora reads.")
    flags.DEFINE_float("lora_scale", 1.0, "LoRA strength s in W += s * B @ A.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on. The demo has no authentication: keep the "
                        "default (this machine only) unless the network is trusted.")
    flags.DEFINE_integer("port", 8000, "Port to listen on; 0 = any free port (the URL is printed).")
    flags.DEFINE_string("workdir", "demo_runs", "Where jobs are stored (workdir/jobs/ID/).")
    flags.DEFINE_integer("num_steps", 50, "Denoising steps per clip.")
    flags.DEFINE_float("cfg_scale", None, "Text guidance scale (default: the config's sample.cfg_scale, else 5).")
    flags.DEFINE_float("shift", None, "Flow-matching shift (default: config.erft.shift, the shift it was trained at).")
    flags.DEFINE_enum("solver", "euler", ["euler", "unipc"], "Sampler, as python -m svi_jax.sample --solver.")
    flags.DEFINE_enum("chain", "pixel", ["pixel", "latent"], "Clip chaining, as python -m svi_jax.sample --chain.")
    flags.DEFINE_integer("motion_frames", None, "Frames carried to the next clip (default: the config's).")
    flags.DEFINE_enum("pad", None, ["ref", "zero"], "Conditioning padding (default: the config's).")
    flags.DEFINE_string("negative_prompt", NEGATIVE_PROMPT, "Negative prompt (default: the official SVI one).")
    flags.DEFINE_integer("seed_times", 42, "Seed stride between clips (clip k: seed + k * seed_times).")
    flags.DEFINE_float("fps", None, "Frame rate of the mp4 (default: the config's sample.fps, else 24).")
    flags.DEFINE_integer("crf", 17, "x264 quality of the mp4.")
    flags.DEFINE_integer("max_queued", 4, "Jobs that may wait behind the running one.")
    flags.DEFINE_integer("max_clips", 100, "Most clips one job may ask for.")
    flags.DEFINE_integer("max_prompt_chars", 2000, "Longest prompt accepted (characters).")
    flags.DEFINE_float("max_image_mb", 20.0, "Largest reference image accepted (MB).")
    flags.mark_flags_as_required(["config"])


def sampler_factory(FLAGS, config):
    """``factory(on_step) -> LongVideoSampler`` with this command's settings (what ``python -m svi_jax.sample``
    builds from the same flags)."""
    from svi_jax import sample

    defaults = config.get("sample", {})
    cfg_scale = FLAGS.cfg_scale if FLAGS.cfg_scale is not None else float(defaults.get("cfg_scale", 5.0))
    shift = FLAGS.shift if FLAGS.shift is not None else float(config.erft.shift)

    def factory(on_step):
        return sample.LongVideoSampler(config, lora=FLAGS.lora, lora_scale=FLAGS.lora_scale,
                                       num_steps=FLAGS.num_steps, shift=shift, cfg_scale=cfg_scale,
                                       solver=FLAGS.solver, chain=FLAGS.chain, motion_frames=FLAGS.motion_frames,
                                       pad=FLAGS.pad, negative_prompt=FLAGS.negative_prompt, on_step=on_step)

    return factory, {"cfg_scale": cfg_scale, "shift": shift}


def run_inputs(FLAGS) -> dict:
    """The LoRA part of the settings ``generate`` stores and checks on resume (as the sample CLI records it)."""
    from svi_jax import sample

    inputs = {"lora": None, "lora_scale": float(FLAGS.lora_scale)}
    if FLAGS.lora:
        inputs["lora"] = sample.lora_records(FLAGS.lora, float(FLAGS.lora_scale))
    return inputs


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(64)
    return sock


def main(argv) -> int:
    from absl import flags

    from svi_jax.demo import app as app_lib
    from svi_jax.demo import jobs, validate
    from svi_jax.logs import quiet_logs

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    logging.getLogger("svi_jax.demo").setLevel(logging.INFO)
    config = FLAGS.config
    if config.model.model_type != "i2v":
        raise ValueError(f"the demo chains clips through image conditioning: it needs an I2V config "
                         f"(config.model.model_type = {config.model.model_type!r})")
    for name, lo in (("num_steps", 1), ("max_queued", 0), ("max_clips", 1), ("max_prompt_chars", 1)):
        if FLAGS[name].value < lo:
            raise ValueError(f"--{name} must be at least {lo}, got {FLAGS[name].value}")
    limits = validate.Limits(max_image_bytes=int(FLAGS.max_image_mb * 2 ** 20), max_clips=FLAGS.max_clips,
                             max_prompt_chars=FLAGS.max_prompt_chars)
    inputs = run_inputs(FLAGS)                       # a missing LoRA fails here, before the server starts
    factory, resolved = sampler_factory(FLAGS, config)
    fps = FLAGS.fps if FLAGS.fps is not None else float(config.get("sample", {}).get("fps", 24.0))
    sock = bind(FLAGS.host, FLAGS.port)
    queue = jobs.JobQueue(lambda: jobs.SamplerRunner(factory, seed_times=FLAGS.seed_times, fps=fps,
                                                     crf=FLAGS.crf, inputs=inputs), max_queued=FLAGS.max_queued)
    found = app_lib.load_jobs(queue, FLAGS.workdir)
    d = config.data
    info = {"config": os.path.basename(str(flags.FLAGS["config"].config_filename)),
            "lora": " + ".join(os.path.basename(x.rstrip("/")) for x in FLAGS.lora) if FLAGS.lora else None,
            "height": int(d.height), "width": int(d.width), "num_frames": int(d.num_frames),
            "num_steps": FLAGS.num_steps, "solver": FLAGS.solver, "chain": FLAGS.chain, "fps": fps,
            "seed_times": FLAGS.seed_times,
            "motion_frames": int(FLAGS.motion_frames if FLAGS.motion_frames is not None else d.num_motion_frames),
            **resolved}
    web = app_lib.create_app(queue, FLAGS.workdir, limits, info)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if FLAGS.host not in LOOPBACK:
        print(f"warning: listening on {FLAGS.host}: anyone who can reach it can run jobs (no authentication)",
              file=sys.stderr)
    print(f"svi_jax.demo: serving {url} (models loading in the background; {found} earlier job(s) in "
          f"{os.path.abspath(FLAGS.workdir)})", flush=True)
    serve(web, sock)
    queue.close()
    return 0


def serve(web, sock: socket.socket) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(web, log_level="warning", timeout_graceful_shutdown=2,
                                           lifespan="off"))
    server.run(sockets=[sock])


if __name__ == "__main__":
    from svi_jax import cli

    cli.absl_run(main, _define_flags)
