"""What the plans (``svi_jax.plan``, ``svi_jax.sample_plan``, ``svi_jax.pro_plan``) share: the chips they compare
with, ``--mesh`` parsing, TPU topologies for ahead-of-time compilation, the compiled program's memory per device."""
from __future__ import annotations

import os

CHIPS = {  # HBM bytes, dense bf16 FLOP/s
    "v5p": {"hbm_gb": 95.0, "bf16_tflops": 459.0},
    "v5e": {"hbm_gb": 16.0, "bf16_tflops": 197.0},
    "v4": {"hbm_gb": 32.0, "bf16_tflops": 275.0},
    "a100-80": {"hbm_gb": 80.0, "bf16_tflops": 312.0},
    "h100-80": {"hbm_gb": 80.0, "bf16_tflops": 989.0},
}
GB = 1e9


def parse_mesh(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--mesh entries are axis=size, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = int(v)
    return out


_TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
_TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def default_topology(chip: str, n: int) -> str:
    if chip in ("v5p", "v4"):
        table = _TPU_3D
    elif chip == "v5e":
        table = _TPU_2D
    else:
        raise ValueError(f"--target tpu needs a TPU --chip (v5p, v5e, v4), got {chip!r}")
    if n not in table:
        raise ValueError(f"no default {chip} topology for {n} chips; pass --topology (e.g. {chip}:2x2x2)")
    return f"{chip}:{table[n]}"


def tpu_devices(topology: str):
    """The devices of a TPU slice for ahead-of-time compilation (no TPU needed; libtpu must be installed)."""
    import importlib.util

    if not os.environ.get("TPU_LIBRARY_PATH") and importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("--target tpu compiles with the TPU compiler in libtpu: pip install 'libtpu==0.0.42.*' "
                           "(the version jax 0.10.2's [tpu] extra pins), or set TPU_LIBRARY_PATH to a libtpu.so")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata here
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology, "tpu").devices)


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {"arguments": mem.argument_size_in_bytes / GB, "outputs": mem.output_size_in_bytes / GB,
            "aliased": mem.alias_size_in_bytes / GB, "temporaries": mem.temp_size_in_bytes / GB, "peak": peak / GB}
