"""python -m svi_jax.data {build,synth,cache,show} ...

  build  --videos DIR [--captions CSV --file_column C --caption_column C] --out DIR
  synth  --out DIR [--num_videos 16 --num_frames 33 --height 64 --width 64 --seed 0]
  cache  --dataset DIR --out DIR (--vae D --t5 D [--clip D --tokenizer D] | --config configs/x.py [--config.a.b=v])
         [--windows 1]
  show   --dataset DIR [--num 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from svi_jax import cli as _cli


def _add_data_args(p, defaults=None):
    from svi_jax.data.config import PAD_MODES, default_config

    d = defaults or default_config()
    g = p.add_argument_group("clip sampling (the data config)")
    g.add_argument("--num_frames", type=int, default=d.num_frames)
    g.add_argument("--height", type=int, default=d.height)
    g.add_argument("--width", type=int, default=d.width)
    g.add_argument("--frame_stride", type=int, default=d.frame_stride)
    g.add_argument("--num_motion_frames", type=int, default=d.num_motion_frames)
    g.add_argument("--p_motion", type=float, default=d.p_motion)
    g.add_argument("--pad_mode", choices=PAD_MODES, default=d.pad_mode,
                   help="ref: the reference image (Shot), zero: zeros (Film), mix: either, per clip")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--workers", type=int, default=2, help="clips decoded concurrently")


def _data_config(args):
    from svi_jax.data.config import default_config

    return default_config(num_frames=args.num_frames, height=args.height, width=args.width,
                          frame_stride=args.frame_stride, num_motion_frames=args.num_motion_frames,
                          p_motion=args.p_motion, pad_mode=args.pad_mode, seed=args.seed,
                          num_workers=args.workers)


def cmd_build(args) -> int:
    from svi_jax.data.builder import SUMMARY_FILE, NoUsableVideos, build_dataset, format_summary
    from svi_jax.data.scan import CaptionError

    if args.captions is None and (args.file_column or args.caption_column):
        print("error: --file_column/--caption_column need --captions CSV", file=sys.stderr)
        return 2
    try:
        summary = build_dataset(
            args.videos, args.out, captions=args.captions,
            file_column=args.file_column or "Filename", caption_column=args.caption_column or "Video Description",
            encoding=args.encoding, caption_errors=args.caption_errors, min_frames=args.min_frames,
            min_size=args.min_size, max_decode_errors=args.max_decode_errors, workers=args.workers,
            overwrite=args.overwrite, progress=not args.quiet, clip_frames=args.clip_frames)
    except (CaptionError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NoUsableVideos as e:
        print(format_summary(e.summary))
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"  summary: {os.path.join(args.out, SUMMARY_FILE)}")
    return 0


def cmd_synth(args) -> int:
    from svi_jax.data.synthetic import MOTIONS, write_dataset

    motions = tuple(args.motions.split(",")) if args.motions else MOTIONS
    specs = write_dataset(args.out, num_videos=args.num_videos, num_frames=args.num_frames, height=args.height,
                          width=args.width, fps=args.fps, seed=args.seed, motions=motions, progress=not args.quiet)
    print(f"wrote {len(specs)} clips ({args.num_frames} frames, {args.height}x{args.width}) to {args.out} "
          f"in categories {sorted(set(s.motion for s in specs))}; parameters in {args.out}/synthetic.json")
    return 0


def load_config_file(path: str, overrides=()):
    """The config of a config file such as configs/tiny.py, with ``KEY=VALUE`` overrides, every key checked
    (:func:`svi_jax.cli.load_config`)."""
    return _cli.load_config(path, list(overrides))


def cmd_cache(args) -> int:
    from svi_jax.data import cache

    if args.config_overrides and not args.config:
        print("error: --config.KEY=VALUE overrides need --config CONFIG.py", file=sys.stderr)
        return 2
    if args.config:
        train_cfg = load_config_file(args.config, args.config_overrides)
        enc = cache.encoders_from_train_config(train_cfg)
        cfg = train_cfg.data
        cfg.num_workers = args.workers
    elif args.vae and args.t5:
        enc = cache.encoders_from_checkpoints(args.vae, args.t5, args.clip, args.tokenizer)
        cfg = _data_config(args)
    else:
        print("error: give --config CONFIG.py, or --vae DIR and --t5 DIR (and --clip DIR for I2V)", file=sys.stderr)
        return 2
    info = cache.write_cache(args.dataset, args.out, enc, cfg, windows=args.windows, batch_size=args.batch_size,
                             dtype=args.dtype, shard=args.shard, num_shards=args.num_shards,
                             overwrite=args.overwrite, progress=not args.quiet)
    print(f"latent cache shard {args.shard}/{args.num_shards}: {info['num_videos']} videos x {info['windows']} "
          f"windows -> {args.out}")
    print(json.dumps({k: info[k] for k in ("shapes", "text_len", "dtype", "i2v")}))
    return 0


def cmd_show(args) -> int:
    from svi_jax.data.builder import open_dataset

    src = open_dataset(args.dataset)
    print(f"{len(src)} videos in {args.dataset}")
    for i in range(min(args.num, len(src))):
        r = src[i]
        print(f"  [{i}] {r['key'].decode()}: {int(r['num_frames'])} frames {int(r['width'])}x{int(r['height'])} "
              f"@{float(r['fps']):.2f} fps, {len(r['video'])} bytes — {r['caption'].decode()[:80]!r}")
    return 0


def main(argv=None) -> int:
    ap = _cli.ArgumentParser(prog="python -m svi_jax.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="folder of videos + captions -> TFDS array_record dataset")
    b.add_argument("--videos", required=True, help="official layout (category subfolders with <category>.csv) "
                   "or a flat folder with --captions")
    b.add_argument("--out", required=True)
    b.add_argument("--captions", help="caption CSV for a flat folder")
    b.add_argument("--file_column", help="column of --captions naming the video (default Filename)")
    b.add_argument("--caption_column", help="column of --captions with the caption (default 'Video Description')")
    b.add_argument("--encoding", default="utf-8", help="CSV encoding")
    b.add_argument("--caption_errors", choices=("skip", "replace", "cp1252"), default="skip",
                   help="captions that are not valid text in --encoding: skip the video, replace bad bytes, "
                        "or read them as cp1252")
    b.add_argument("--min_frames", type=int, default=5, help="skip videos with fewer decodable frames")
    b.add_argument("--min_size", type=int, default=16, help="skip videos whose short side is smaller")
    b.add_argument("--max_decode_errors", type=int, default=0, help="skip videos with more ffmpeg decode errors")
    b.add_argument("--workers", type=int, default=2, help="videos probed concurrently")
    b.add_argument("--clip_frames", type=int, default=81, help="training clip length: shorter videos are noted "
                   "(shorter_than_<N>_frames; the sampler repeats their last frame)")
    b.add_argument("--overwrite", action="store_true", help="rebuild a dataset that exists")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build)

    s = sub.add_parser("synth", help="write synthetic clips (scikit-image pictures, camera motion, sprite)")
    s.add_argument("--out", required=True)
    s.add_argument("--num_videos", type=int, default=16)
    s.add_argument("--num_frames", type=int, default=33)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--fps", type=float, default=16.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--motions", help="comma-separated subset of pan,zoom,rotate,orbit")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_synth)

    c = sub.add_parser("cache", help="encode sampled windows once into a latent cache (--help: the config fields)",
                       config_overrides=True)
    c.add_argument("--dataset", required=True, help="a build output folder")
    c.add_argument("--out", required=True)
    c.add_argument("--config", help="training config file (its encoders and data config are used); override any "
                   "field with --config.a.b=value, e.g. --config.data.height=64")
    c.add_argument("--vae")
    c.add_argument("--t5")
    c.add_argument("--clip")
    c.add_argument("--tokenizer")
    c.add_argument("--windows", type=int, default=1, help="sampled windows per video")
    c.add_argument("--batch_size", type=int, default=1)
    c.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    c.add_argument("--shard", type=int, default=0, help="this process's shard (e.g. jax.process_index())")
    c.add_argument("--num_shards", type=int, default=1)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--quiet", action="store_true")
    _add_data_args(c)
    c.set_defaults(fn=cmd_cache)

    from svi_jax.data import poses

    po = sub.add_parser("pose", help="skeleton videos (DWPose on your ONNX files, or drawn from keypoints) for "
                                     "SVI-Dance")
    poses.add_arguments(po)
    po.set_defaults(fn=poses.run)

    sh = sub.add_parser("show", help="print what a built dataset holds")
    sh.add_argument("--dataset", required=True)
    sh.add_argument("--num", type=int, default=5)
    sh.set_defaults(fn=cmd_show)

    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1

    sys.exit(cli.run(main))
