"""What the plan commands share (importing only svi_jax.cli): chips, config loading, devices for ahead-of-time
compilation, the HLO walk and the memory of a compiled program. :mod:`svi_jax.plan` (train step) and
:mod:`svi_jax.sample_plan` (sampler) both use it."""
from __future__ import annotations

import math
import os
import re
import sys


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




def load_config(path: str, sets=()):
    """The config of ``path`` (``PATH[:ARG]``) with the ``KEY=VALUE`` overrides ``sets``, every key checked
    (:func:`svi_jax.cli.load_config`, the loader of every argparse command)."""
    from svi_jax import cli

    return cli.load_config(path, list(sets or ()))


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


def ensure_devices(n: int, argv) -> None:
    """Make ``jax`` see ``n`` CPU devices: set XLA_FLAGS before the backend starts, or re-exec if it has."""
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags.split():
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:
            from jax._src import xla_bridge

            if getattr(xla_bridge, "_backends", None):
                os.execv(sys.executable, [sys.executable, "-m", "svi_jax.plan", *argv])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ------------------------------------------------------------------------------------------------ HLO walk

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "all-gather-done", "all-reduce-done", "collective-permute-done")  # async pairs: count the -done


def _operands(rest: str) -> list:
    """Operand names of an instruction (``rest`` starts right after the opening parenthesis)."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                end = i
                break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def _dims(s: str):
    return [int(d) for d in s.split(",") if d]


def _array_bytes(type_str: str) -> int:
    return sum(_BYTES.get(t, 4) * math.prod(_dims(d)) for t, d in _SHAPE.findall(type_str))


def _cond_trip_count(comps, rest: str) -> int:
    """Trip count of a ``while`` without a ``known_trip_count`` annotation (the TPU compiler's output): its condition
    ``i < N`` against a constant, the induction variable starting at 0 as in lowered scans/fori_loops."""
    m = re.search(r"condition=%?([\w.\-]+)", rest)
    lines = comps.get(m.group(1), []) if m else []
    consts = {}
    for line in lines:
        c = re.match(r"^\s*%?([\w.\-]+) = s32\[\]\S* constant\((-?\d+)\)", line)
        if c:
            consts[c.group(1)] = int(c.group(2))
    for line in lines:
        if "ROOT" in line and " compare(" in line and "direction=LT" in line:
            ops = _operands(line.split(" compare(", 1)[1])
            vals = [consts[o] for o in ops if o in consts]
            if vals:
                return max(vals[0], 1)
    return 1


def hlo_stats(text: str) -> dict:
    """FLOPs of ``dot``s and bytes of collectives of an optimised HLO module, loops multiplied by their trip counts
    (conditionals: the costliest branch)."""
    comps, order, cur = {}, [], None
    for line in text.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                cur = m.group(1)
                comps[cur] = []
                order.append(cur)
                if line.startswith("ENTRY"):
                    comps["__entry__"] = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        comps[cur].append(line)
    entry = comps.pop("__entry__", order[-1] if order else None)
    memo = {}

    def walk(name):
        if name in memo:
            return memo[name]
        memo[name] = (0.0, 0.0, {})
        shapes, flops, coll, coll_by = {}, 0.0, 0.0, {}
        for line in comps.get(name, []):
            m = _INSTR.match(line)
            if not m:
                continue
            iname, type_str, op, rest = m.groups()
            shapes[iname] = type_str
            if op == "dot":
                out = _SHAPE.search(type_str)
                operands = _operands(rest)
                lhs = shapes.get(operands[0], "") if operands else ""
                lhs_m = _SHAPE.search(lhs)
                cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if out and lhs_m and cd:
                    ldims = _dims(lhs_m.group(2))
                    k = math.prod(ldims[i] for i in _dims(cd.group(1)))
                    flops += 2.0 * math.prod(_dims(out.group(2))) * k
            elif op == "convolution":  # the TPU compiler rewrites many dots as convolutions
                out = _SHAPE.search(type_str)
                operands = _operands(rest)
                rhs_m = _SHAPE.search(shapes.get(operands[1], "")) if len(operands) > 1 else None
                lab = re.search(r"dim_labels=[^_]*_([^-]*)->", rest)
                if out and rhs_m and lab:
                    rdims = _dims(rhs_m.group(2))
                    k = math.prod(d for d, c in zip(rdims, lab.group(1)) if c == "i")
                    # taps per output position: window size / base (lhs) dilation per spatial dim; batched dots
                    # appear as 'window={size=B lhs_dilate=B}' convolutions with one tap
                    size = re.search(r"window=\{[^}]*size=([\dx]+)", rest)
                    dil = re.search(r"window=\{[^}]*lhs_dilate=([\dx]+)", rest)
                    sizes = [int(v) for v in size.group(1).split("x")] if size else []
                    dils = [int(v) for v in dil.group(1).split("x")] if dil else [1] * len(sizes)
                    taps = math.prod(-(-a // b) for a, b in zip(sizes, dils))
                    flops += 2.0 * math.prod(_dims(out.group(2))) * k * taps
            elif op in COLLECTIVES:
                b = _array_bytes(type_str)
                coll += b
                key = op.replace("-done", "")
                coll_by[key] = coll_by.get(key, 0.0) + b
            mult = 1
            if op == "while":
                t = _TRIP.search(rest)
                mult = int(t.group(1)) if t else _cond_trip_count(comps, rest)
            called = _CALLS.findall(rest)
            br = _BRANCHES.search(rest)
            if br:
                subs = [walk(c.strip().lstrip("%")) for c in br.group(1).split(",") if c.strip()]
                if subs:
                    best = max(subs, key=lambda s: s[0])
                    flops += best[0]
                    coll += best[1]
                    for k2, v in best[2].items():
                        coll_by[k2] = coll_by.get(k2, 0.0) + v
            for c in called:
                f2, c2, by2 = walk(c)
                flops += mult * f2
                coll += mult * c2
                for k2, v in by2.items():
                    coll_by[k2] = coll_by.get(k2, 0.0) + mult * v
        memo[name] = (flops, coll, coll_by)
        return memo[name]

    flops, coll, coll_by = walk(entry) if entry else (0.0, 0.0, {})
    return {"flops": flops, "collective_bytes": coll, "collective_bytes_by_kind": coll_by}


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {"arguments": mem.argument_size_in_bytes / GB, "outputs": mem.output_size_in_bytes / GB,
            "aliased": mem.alias_size_in_bytes / GB, "temporaries": mem.temp_size_in_bytes / GB, "peak": peak / GB}
