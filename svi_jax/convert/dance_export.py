"""``convert/from_torch.py dance-to-torch``: an adapter directory (or a trained one) -> the official files."""
from svi_jax.convert.dance import export_file, load_adapter


def add_arguments(p):
    p.add_argument("--src", required=True, help="our dance adapter directory (convert/from_torch.py dance, or a "
                                                "training workdir's adapter/)")
    p.add_argument("--dst", required=True, help="output .safetensors (SVI-Dance layout) or .ckpt (UniAnimate layout)")


def run(args):
    lora, pose, _ = load_adapter(args.src)
    s = export_file(lora, pose, args.dst)
    print(f"wrote {s['tensors']} tensors (pipe.dit.* LoRA + dwpose_embedding.*) -> {s['file']}")
