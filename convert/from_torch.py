#!/usr/bin/env python
"""Convert PyTorch weights (official Wan / diffusers / transformers / SVI LoRA) to svi_jax checkpoints.

Usage:
  python convert/from_torch.py dit  --src PATH --dst DIR [--dtype bfloat16]
  python convert/from_torch.py wan22 --src Wan2.2-I2V-A14B --dst DIR   (both experts: DIR/high, DIR/low)
  python convert/from_torch.py vae  --src Wan2.1_VAE.pth --dst DIR
  python convert/from_torch.py t5   --src models_t5_umt5-xxl-enc-bf16.pth --dst DIR [--tokenizer DIR]
  python convert/from_torch.py clip --src models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth --dst DIR
  python convert/from_torch.py wav2vec2 --src chinese-wav2vec2-base --dst DIR   (SVI-Talk audio features)
  python convert/from_torch.py dit-to-torch --src DIR --dst FILE.safetensors   (back to the official layout)
  python convert/from_torch.py dance --src UniAnimate-Wan2.1-14B-Lora-12000.ckpt --dst DIR   (LoRA + pose module)
  python convert/from_torch.py dance-to-torch --src DIR --dst svi-dance.safetensors          (or .ckpt)
  python convert/from_torch.py lora-export --src runs/x [--format svi|comfyui|diffusers] [--dst FILE]

Each kind detects the source layout (official Wan / diffusers / transformers) from the tensor names, reads
tensors one at a time (safetensors lazily, .pth via torch.load(weights_only=True, mmap=True)), shows a
progress bar, and fails naming the key and both shapes on anything missing, unexpected or mis-shaped.
Run ``python convert/from_torch.py KIND --help`` for the options of one kind.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from svi_jax import cli as _cli  # noqa: E402

# kind -> module in svi_jax.convert providing add_arguments(parser) and run(args)
KINDS = {
    "dit": ("svi_jax.convert.dit", "Wan2.1 DiT (official or diffusers layout)"),
    "wan22": ("svi_jax.convert.wan22", "Wan2.2-A14B: both experts (official or diffusers folder) -> DiTExperts"),
    "dit-to-torch": ("svi_jax.convert.dit_export", "our DiT checkpoint -> official Wan safetensors"),
    "vae": ("svi_jax.convert.vae", "Wan2.1 VAE (Wan2.1_VAE.pth or diffusers AutoencoderKLWan)"),
    "t5": ("svi_jax.convert.t5", "UMT5-XXL encoder (official .pth or transformers UMT5EncoderModel)"),
    "clip": ("svi_jax.convert.clip", "CLIP ViT-H/14 visual tower (official open-clip .pth or transformers)"),
    "dance": ("svi_jax.convert.dance", "UniAnimate / SVI-Dance LoRA + dwpose_embedding (.ckpt or .safetensors)"),
    "dance-to-torch": ("svi_jax.convert.dance_export", "our dance adapter -> SVI-Dance .safetensors / .ckpt"),
    "lora-export": ("svi_jax.convert.lora_export", "a trained LoRA -> svi (default) / comfyui / diffusers names"),
    "wav2vec2": ("svi_jax.convert.wav2vec2", "wav2vec2 audio encoder for SVI-Talk (transformers Wav2Vec2Model)"),
}


def main(argv=None) -> int:
    parser = _cli.ArgumentParser(prog="convert/from_torch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    mods = {}
    for kind, (mod_name, helptext) in KINDS.items():
        p = sub.add_parser(kind, help=helptext, description=helptext)
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:  # a kind whose module is not built yet
            if e.name != mod_name:
                raise
            continue
        mod.add_arguments(p)
        mods[kind] = mod
    args = parser.parse_args(argv)
    if args.kind not in mods:
        parser.error(f"converter {args.kind!r} is not available in this build")
    from svi_jax.convert.common import ConversionError
    from svi_jax.model_dirs import CheckpointError

    try:
        mods[args.kind].run(args)
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1

    sys.exit(cli.run(main))
