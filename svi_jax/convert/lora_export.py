"""``lora-export``: a trained LoRA (a training workdir's ``lora.safetensors``, or any LoRA file svi-jax reads) in the
format another tool loads: ``svi`` (the official SVI / PEFT names, the default), ``comfyui`` (``diffusion_model.`` +
``lora_down/lora_up/alpha``, what ComfyUI's LoRA loader maps for Wan) or ``diffusers`` (``transformer.`` + diffusers
module names). See :func:`svi_jax.lora_formats.write`."""
from __future__ import annotations

import os

from svi_jax import lora_formats


def add_arguments(p) -> None:
    p.add_argument("--src", required=True, help="a training workdir (runs/x: its lora.safetensors) or a LoRA file")
    p.add_argument("--format", default="svi", choices=lora_formats.FORMATS,
                   help="svi (default; official SVI/PEFT names), comfyui or diffusers")
    p.add_argument("--dst", default=None, help="output .safetensors (default: SRC_DIR/lora_<format>.safetensors)")


def run(args) -> str:
    src = args.src
    if not os.path.exists(src):
        raise lora_formats.LoRAError(f"--src {src} does not exist (a training workdir or a LoRA .safetensors file)")
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    dst = args.dst or os.path.join(folder, f"lora_{args.format}.safetensors")
    sd = lora_formats.read(src)
    out = lora_formats.write(sd, dst, args.format)
    print(f"wrote {dst} ({args.format}, {len(out)} tensors)")
    return dst
