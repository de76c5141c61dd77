"""``convert/from_torch.py dit-to-torch``: our DiT checkpoint -> official Wan layout safetensors."""
from svi_jax.convert.dit import export_official


def add_arguments(p):
    p.add_argument("--src", required=True, help="our converted DiT directory")
    p.add_argument("--dst", required=True, help="output .safetensors file (config.json is written beside it)")


def run(args):
    s = export_official(args.src, args.dst)
    print(f"wrote {s['tensors']} tensors in the official Wan layout -> {s['file']}")
