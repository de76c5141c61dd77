"""Shared machinery of the PyTorch -> svi_jax converters.

* :class:`TensorSource` opens a checkpoint *lazily*: a ``.safetensors`` file, a directory of sharded
  safetensors (with or without ``*.index.json``), or a ``.pth``/``.pt``/``.bin`` file read with
  ``torch.load(weights_only=True, mmap=True)``. Tensors are read one at a time, so converting a 14B model
  needs about one copy of the output plus one tensor in host RAM, never two copies of the model.
* :class:`Assembler` fills preallocated target arrays (including per-layer slices of the stacked, scanned
  block parameters) and fails naming the key and both shapes on anything missing, unexpected or mis-shaped.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Iterable

import numpy as np

try:  # bfloat16 for numpy (ships with jax)
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover
    BF16 = None


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the key(s) and shape(s)."""


def parse_dtype(name: str | None):
    if name in (None, "", "auto"):
        return None
    return {"float32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
            "bfloat16": BF16, "bf16": BF16, "float16": np.dtype(np.float16), "fp16": np.dtype(np.float16)}[name]


class TensorSource:
    """Lazy read access to the tensors of a PyTorch checkpoint (file or directory)."""

    def __init__(self, src: str, strip_prefixes: Iterable[str] = ()):
        self.src = os.path.abspath(src)
        self._where: dict[str, tuple[str, str]] = {}  # key -> (kind, file)
        self._torch_sd = None
        self.config: dict | None = None
        self.check_finite = True      # every tensor read is checked for NaN/inf (an error naming the key)
        files = self._files()
        if not files:
            raise ConversionError(f"no checkpoint files found at {src} "
                                  f"(expected .safetensors, a sharded safetensors directory, or .pth/.pt/.bin)")
        self._st_headers: dict[str, tuple[int, dict]] = {}
        for f in files:
            if f.endswith(".safetensors"):
                offset, header = _read_st_header(f)
                self._st_headers[f] = (offset, header)
                for k in header:
                    if k != "__metadata__":
                        self._where[k] = ("st", f)
            else:
                sd = _torch_load(f)
                if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                    sd = sd["state_dict"]
                if not isinstance(sd, dict):
                    raise ConversionError(f"{f}: expected a state dict, got {type(sd).__name__}")
                self._torch_sd = {**(self._torch_sd or {}), **sd}
                for k in sd:
                    self._where[k] = ("pt", f)
        # Strip wrapper prefixes (e.g. "model.", "pipe.dit.") when every key carries them.
        self._alias = {k: k for k in self._where}
        for p in strip_prefixes:
            if self._alias and all(k.startswith(p) for k in self._alias):
                self._alias = {k[len(p):]: v for k, v in self._alias.items()}
        cfg_dir = self.src if os.path.isdir(self.src) else os.path.dirname(self.src)
        cfg = os.path.join(cfg_dir, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as fh:
                self.config = json.load(fh)

    def _files(self) -> list[str]:
        if os.path.isfile(self.src):
            return [self.src]
        if not os.path.isdir(self.src):
            raise ConversionError(f"source {self.src} does not exist")
        index = sorted(glob.glob(os.path.join(self.src, "*.safetensors.index.json")))
        if index:
            with open(index[0]) as fh:
                wm = json.load(fh)["weight_map"]
            return sorted({os.path.join(self.src, v) for v in wm.values()})
        st = sorted(glob.glob(os.path.join(self.src, "*.safetensors")))
        if st:
            return st
        return sorted(glob.glob(os.path.join(self.src, "*.pth")) + glob.glob(os.path.join(self.src, "*.pt"))
                      + glob.glob(os.path.join(self.src, "*.bin")))

    def keys(self) -> list[str]:
        return sorted(self._alias)

    def __contains__(self, key: str) -> bool:
        return key in self._alias

    def _entry(self, key: str):
        real = self._alias.get(key)
        if real is None:
            raise ConversionError(f"missing key {key!r} in {self.src}")
        kind, f = self._where[real]
        return real, kind, f

    def shape(self, key: str) -> tuple[int, ...]:
        real, kind, f = self._entry(key)
        if kind == "st":
            return tuple(self._st_headers[f][1][real]["shape"])
        return tuple(self._torch_sd[real].shape)

    def is_half(self, key: str) -> bool:
        """Whether the stored tensor is bf16/fp16 (converted checkpoints then default to bf16)."""
        real, kind, f = self._entry(key)
        if kind == "st":
            return self._st_headers[f][1][real]["dtype"] in ("BF16", "F16")
        import torch

        return self._torch_sd[real].dtype in (torch.bfloat16, torch.float16)

    def get(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (half-precision sources come back as float32).

        safetensors are read with one positioned read per tensor (no memory map), so pages of tensors already
        converted do not stay resident.
        """
        real, kind, f = self._entry(key)
        if kind == "st":
            offset, header = self._st_headers[f]
            info = header[real]
            start, end = info["data_offsets"]
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:
                raise ConversionError(f"{f}: tensor {real!r} has unsupported dtype {info['dtype']}")
            with open(f, "rb") as fh:
                fh.seek(offset + start)
                buf = fh.read(end - start)
            n = int(np.prod(info["shape"], dtype=np.int64)) * dt.itemsize
            if len(buf) != n or end - start != n:
                raise ConversionError(f"{f}: tensor {real!r} {tuple(info['shape'])} needs {n} bytes but the file holds "
                                      f"{len(buf)}: the file is truncated or damaged; download it again")
            a = np.frombuffer(buf, dtype=dt).reshape(info["shape"])
            a = a.astype(np.float32) if a.dtype in (np.dtype(np.float16), BF16) else a.copy()
        else:
            import torch

            t = self._torch_sd[real]
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            try:
                a = t.detach().cpu().numpy()
            except RuntimeError as e:  # a truncated mmap'ed .pth
                raise ConversionError(f"{f}: tensor {real!r} cannot be read ({e}); the file is damaged") from None
        if self.check_finite:
            from svi_jax.integrity import first_nonfinite

            bad = first_nonfinite(a)
            if bad is not None:
                raise ConversionError(f"{f}: tensor {real!r} holds {bad[0]} non-finite (NaN/inf) value(s) of "
                                      f"{bad[1]}; the source is damaged or comes from a diverged run")
        return a


_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BF16, "F64": np.dtype(np.float64),
              "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
              "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool)}


def _torch_load(path: str):
    """``torch.load(weights_only=True, mmap=True)``; a file that is not a plain tensor archive (pickled code, the
    legacy format, damaged) is a :class:`ConversionError` naming the file (never advice to weaken the loader)."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError,
            AttributeError, TypeError) as e:
        text = str(e)
        if "legacy" in text or "mmap" in text or "zip" in text.lower():
            why = "it is in torch's legacy (non-zip) format or truncated"
        elif "Weights only" in text or "Unsupported global" in text or "GLOBAL" in text:
            why = "it holds pickled objects other than tensors (code may run when such a file is loaded)"
        else:
            why = f"it is damaged or not a torch checkpoint ({text.splitlines()[0][:120] if text else type(e).__name__})"
        raise ConversionError(f"{path} cannot be read as a plain tensor file: {why}. Use the official release "
                              f"file, or re-save it as .safetensors with a tool you trust") from None


def _read_st_header(path: str) -> tuple[int, dict]:
    """(data offset, header) of a safetensors file: 8-byte little-endian length, then a JSON header."""
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ConversionError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise ConversionError(f"{path} is not a safetensors file ({e})") from None
    return 8 + n, header


class Assembler:
    """Preallocated output tree, filled tensor by tensor with shape checks.

    ``spec`` maps our flat param path (``"blocks/self_attn/q/kernel"``) to ``(shape, dtype)``; stacked (scanned)
    params have the layer axis first and are filled slice by slice with ``layer=i``.
    """

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], np.dtype]], source_name: str):
        self.spec = spec
        self.source_name = source_name
        self.arrays = {k: np.zeros(s, d) for k, (s, d) in spec.items()}
        self.filled: dict[str, int] = {k: 0 for k in spec}
        self.consumed: set[str] = set()

    def put(self, dst: str, value: np.ndarray, src_key: str, layer: int | None = None) -> None:
        if dst not in self.arrays:
            raise ConversionError(f"internal: no target {dst!r} for source key {src_key!r}")
        target = self.arrays[dst]
        want = target.shape[1:] if layer is not None else target.shape
        if tuple(value.shape) != tuple(want):
            raise ConversionError(
                f"shape mismatch for source key {src_key!r} -> {dst!r}"
                f"{'' if layer is None else f'[layer {layer}]'}: expected {tuple(want)}, got {tuple(value.shape)}")
        if layer is None:
            target[...] = value.astype(target.dtype)
            self.filled[dst] += 1
        else:
            target[layer] = value.astype(target.dtype)
            self.filled[dst] += 1
        self.consumed.add(src_key)

    def finish(self, all_source_keys: Iterable[str], ignore: Callable[[str], bool] = lambda k: False):
        problems = []
        for k, (shape, _) in self.spec.items():
            need = shape[0] if k.startswith("blocks/") else 1
            if self.filled[k] != need:
                problems.append(f"target {k!r} {tuple(shape)} was filled {self.filled[k]} time(s), expected {need}")
        unexpected = [k for k in all_source_keys if k not in self.consumed and not ignore(k)]
        if unexpected:
            problems += [f"unexpected source key {k!r}" for k in unexpected[:20]]
            if len(unexpected) > 20:
                problems.append(f"... and {len(unexpected) - 20} more unexpected keys")
        if problems:
            raise ConversionError(f"cannot convert {self.source_name}:\n  " + "\n  ".join(problems))
        return self.arrays


def block_index(key: str, prefix: str = "blocks.") -> tuple[int, str] | None:
    """'blocks.12.self_attn.q.weight' -> (12, 'self_attn.q.weight')."""
    m = re.match(re.escape(prefix) + r"(\d+)\.(.+)$", key)
    if not m:
        return None
    return int(m.group(1)), m.group(2)


def progress(iterable, total=None, desc="converting"):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Reads ``VmHWM`` from ``/proc/self/status`` (the high-water mark of this process's own address space).
    ``getrusage().ru_maxrss`` is only the fallback: Linux carries it across ``fork`` + ``exec``, so a subprocess
    started from a 15 GB parent reports 15 GB whatever it does itself."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
