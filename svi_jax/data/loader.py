"""Deterministic, resumable, host-sharded batch iterators over a random-access source.

Order: epoch e uses the permutation rng([seed, e]) of all N examples, cut into blocks of b = the per-host
batch; host h of n takes blocks h, h+n, h+2n, ... of it, so within an epoch the hosts' shards are disjoint and
together cover every example once, and the global batch (host 0's batch, then host 1's, ...) is the same
consecutive run of the permutation for any number of hosts (exactly the one-host batch while N is a multiple
of the global batch). A host's stream is infinite (epoch after epoch); its position p maps to (epoch, index)
arithmetically, so the whole iterator state is one integer (plus checks), and the random choices of an
example depend only on (seed, epoch, index) — not on the host count, the prefetch depth or timing.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from typing import Any, Optional

import numpy as np

from svi_jax.data import config as config_lib
from svi_jax.data import windows
from svi_jax.data.video import VideoError, decode_bytes

log = logging.getLogger(__name__)

STATE_VERSION = 1


class ShardOrder:
    """Maps a host-local position to (epoch, example index)."""

    def __init__(self, num_examples: int, seed: int, host_id: int = 0, num_hosts: int = 1,
                 shuffle: bool = True, block: int = 1):
        if not 0 <= host_id < num_hosts:
            raise ValueError(f"host_id {host_id} not in 0..{num_hosts - 1}")
        if num_examples < num_hosts:
            raise ValueError(f"{num_examples} examples cannot be sharded over {num_hosts} hosts")
        self.num_examples, self.seed, self.shuffle = num_examples, seed, shuffle
        self.host_id, self.num_hosts, self.block = host_id, num_hosts, max(1, int(block))
        # permutation slots of this host: blocks host_id, host_id + num_hosts, ... (the last one may be short)
        b, n = self.block, num_hosts
        self.slots = np.array([i for c in range(host_id, -(-num_examples // b), n)
                               for i in range(c * b, min((c + 1) * b, num_examples))], np.int64)
        self.shard_size = len(self.slots)
        if self.shard_size == 0:
            raise ValueError(f"{num_examples} examples in blocks of {b} leave host {host_id} of {n} nothing")
        self._perm_cache = collections.OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                perm = np.arange(self.num_examples)
            self._perm_cache[epoch] = perm
            while len(self._perm_cache) > 2:
                self._perm_cache.popitem(last=False)
        return perm

    def __call__(self, position: int) -> tuple:
        epoch, k = divmod(int(position), self.shard_size)
        return epoch, int(self.permutation(epoch)[self.slots[k]])

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The example indices this host reads in an epoch, in order."""
        return self.permutation(epoch)[self.slots]


def host_info(host_id: Optional[int], num_hosts: Optional[int]) -> tuple:
    if host_id is None or num_hosts is None:
        import jax

        host_id = jax.process_index() if host_id is None else host_id
        num_hosts = jax.process_count() if num_hosts is None else num_hosts
    return int(host_id), int(num_hosts)


class BatchIterator:
    """Base: prefetching, ordered batches of `load(epoch, index)` results (dicts of arrays/str).

    State = {'position': next example position of this host, ...checks}; get_state()/set_state().
    """

    kind = "base"

    def __init__(self, num_examples: int, *, batch_size: int, seed: int, host_id: Optional[int] = None,
                 num_hosts: Optional[int] = None, shuffle: bool = True, num_workers: int = 2,
                 prefetch: int = 2):
        host_id, num_hosts = host_info(host_id, num_hosts)
        if batch_size % num_hosts:
            raise ValueError(f"global batch_size {batch_size} is not divisible by {num_hosts} hosts")
        self.global_batch_size = batch_size
        self.batch_size = batch_size // num_hosts  # per host
        self.order = ShardOrder(num_examples, seed, host_id, num_hosts, shuffle, block=self.batch_size)
        self.seed = seed
        self.num_workers = max(0, num_workers)
        self.lookahead = max(1, prefetch) * self.batch_size if self.num_workers else 0
        self.position = 0
        self.stats = collections.Counter()
        self._pool = None
        self._pending = collections.deque()  # (position, future), positions consecutive from self.position
        self._lock = threading.Lock()

    # -- subclass API --
    def load(self, epoch: int, index: int) -> dict:
        raise NotImplementedError

    def collate(self, examples: list) -> dict:
        out = {}
        for k in examples[0]:
            vals = [ex[k] for ex in examples]
            if isinstance(vals[0], (str, bytes)):
                out[k] = np.array(vals, dtype=object)
            elif len(vals) == 1:  # no copy of a (possibly ~400 MB) clip for per-host batch 1
                out[k] = np.asarray(vals[0])[None]
            else:
                out[k] = np.stack([np.asarray(v) for v in vals])
        return out

    # -- iteration --
    def example(self, position: int) -> dict:
        """The example at a host-local position (no prefetch); adds 'index' and 'epoch'."""
        return self._example_at(*self.order(position))

    def _example_at(self, epoch: int, index: int) -> dict:
        ex = self.load(epoch, index)
        ex["index"] = np.int64(index)
        ex["epoch"] = np.int64(epoch)
        return ex

    def _fill(self):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers,
                                                               thread_name_prefix=f"svi-{self.kind}")
        nxt = self.position + len(self._pending)
        while len(self._pending) < self.lookahead + self.batch_size:
            self._pending.append((nxt, self._pool.submit(self._example_at, *self.order(nxt))))
            nxt += 1

    def _next_example(self) -> dict:
        if self.num_workers == 0:
            ex = self.example(self.position)
        else:
            self._fill()
            pos, fut = self._pending.popleft()
            assert pos == self.position
            ex = fut.result()
        self.position += 1
        return ex

    def __iter__(self):
        return self

    def peek(self) -> dict:
        """The next batch without advancing (e.g. to compile the train step on real shapes)."""
        if self.num_workers == 0:
            return self.collate([self.example(self.position + j) for j in range(self.batch_size)])
        self._fill()
        return self.collate([fut.result() for _, fut in list(self._pending)[: self.batch_size]])

    def __next__(self) -> dict:
        batch = self.collate([self._next_example() for _ in range(self.batch_size)])
        if self.num_workers:
            self._fill()
        return batch

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch of the smallest host shard (same on every host)."""
        return (self.order.num_examples // self.order.num_hosts) // self.batch_size

    def get_state(self) -> dict:
        """Small JSON-able dict; save it with orbax (e.g. ocp.args.JsonSave) next to the train state."""
        o = self.order
        return {"version": STATE_VERSION, "kind": self.kind, "position": int(self.position),
                "seed": int(self.seed), "num_examples": int(o.num_examples), "host_id": int(o.host_id),
                "num_hosts": int(o.num_hosts), "batch_size": int(self.global_batch_size),
                "shuffle": bool(o.shuffle)}

    def set_state(self, state: dict) -> None:
        """Resume: the next batch equals the one an uninterrupted run would produce next."""
        mine = self.get_state()
        for k in ("kind", "seed", "num_examples", "host_id", "num_hosts", "batch_size", "shuffle"):
            if k in state and _py(state[k]) != mine[k]:
                raise ValueError(f"loader state mismatch on {k!r}: checkpoint has {_py(state[k])!r}, "
                                 f"this loader {mine[k]!r} (the dataset or config changed since it was saved)")
        self._cancel()
        self.position = int(_py(state["position"]))

    def _cancel(self):
        while self._pending:
            self._pending.popleft()[1].cancel()

    def close(self):
        self._cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _py(v: Any):
    return v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0) else v


def _text(v) -> str:
    if isinstance(v, np.ndarray):
        v = v.item()
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class ClipLoader(BatchIterator):
    """Training clips from a built video dataset (see builder.build_dataset), sampled as the official code.

    Batches: video [B,T,H,W,3] f32, cond [B,T,H,W,3] f32, first_frame [B,H,W,3] f32, num_cond [B] i32,
    caption [B] object (str), index [B] i64, epoch [B] i64. B = config.batch_size / num_hosts.
    source: a build output folder, or any random-access sequence of dicts with the builder's features.
    """

    kind = "clips"

    def __init__(self, source, config=None, *, host_id: Optional[int] = None,
                 num_hosts: Optional[int] = None, **overrides):
        cfg = config if config is not None else config_lib.default_config()
        if overrides:
            cfg = cfg.copy_and_resolve_references()
            cfg.update(overrides)
        config_lib.validate(cfg)
        self.config = cfg
        if isinstance(source, str):
            from svi_jax.data.builder import open_dataset

            source = open_dataset(source)
        self.source = source
        super().__init__(len(source), batch_size=cfg.batch_size, seed=cfg.seed, host_id=host_id,
                         num_hosts=num_hosts, shuffle=cfg.shuffle, num_workers=cfg.num_workers,
                         prefetch=cfg.prefetch)

    def _record(self, index: int) -> dict:
        with self._lock:
            return self.source[index]

    def load(self, epoch: int, index: int) -> dict:
        cfg = self.config
        tried = []
        for attempt in range(cfg.max_retries + 1):
            idx = index if attempt == 0 else int(
                np.random.default_rng([cfg.seed, epoch, index, attempt]).integers(self.order.num_examples))
            rng = np.random.default_rng([cfg.seed, epoch, idx])
            try:
                rec = self._record(idx)
                return self._sample(rec, rng)
            except (VideoError, ValueError, OSError) as e:
                tried.append(f"{idx}: {e}")
                with self._lock:
                    self.stats["load_errors"] += 1
                log.warning("example %d unusable (%s); substituting another", idx, e)
        raise RuntimeError(f"{cfg.max_retries + 1} examples in a row failed to load: {tried}")

    def _sample(self, rec: dict, rng: np.random.Generator) -> dict:
        cfg = self.config
        total, h, w = int(rec["num_frames"]), int(rec["height"]), int(rec["width"])
        plan = windows.plan_clip(total, h, w, cfg, rng)
        data = rec["video"]
        data = data.item() if isinstance(data, np.ndarray) else data
        ext = _text(rec.get("ext", ".mp4")) or ".mp4"
        kw = dict(start=plan.start, count=plan.num_real, stride=plan.stride, crop=plan.crop,
                  size=(cfg.height, cfg.width), fps=float(rec["fps"]), threads=cfg.decode_threads)
        frames = decode_bytes(data, suffix=ext, seek=cfg.seek, **kw)
        if frames.shape[0] < plan.num_real and cfg.seek and plan.start > 0:
            with self._lock:
                self.stats["seek_fallbacks"] += 1
            frames = decode_bytes(data, suffix=ext, seek=False, **kw)
        if frames.shape[0] < plan.num_real:
            with self._lock:
                self.stats["short_decodes"] += 1
        example = windows.assemble(frames, plan, _text(rec["caption"]))
        if plan.anchor >= 0:   # SVI 2.0 Pro: the anchor frame from outside the clip, same crop and size
            kw_a = dict(kw, start=plan.anchor, count=1, stride=1)
            a = decode_bytes(data, suffix=ext, seek=cfg.seek, **kw_a)
            if a.shape[0] < 1:
                a = decode_bytes(data, suffix=ext, seek=False, **kw_a)
            if a.shape[0] < 1:
                raise VideoError(f"the anchor frame {plan.anchor} did not decode")
            example["anchor"] = windows.to_float(a[:1])[0]
        pose = rec.get("pose", b"")
        pose = pose.item() if isinstance(pose, np.ndarray) else pose
        if pose:        # SVI-Dance: the skeleton frames of the same window, crop and size (0..255 float32)
            example["pose"] = windows.pose_window(decode_bytes(pose, suffix=".mp4", seek=False, **kw), plan)
        audio = rec.get("audio", b"")
        audio = audio.item() if isinstance(audio, np.ndarray) else audio
        if audio:       # SVI-Talk: the clip's audio windows; its first frame mapped to the 25 steps/s timeline
            example.update(_audio_windows(audio, plan.start, float(rec["fps"]), cfg.num_frames))
        return example


def _audio_windows(audio: bytes, start_frame: int, fps: float, num_frames: int) -> dict:
    """``audio_first [1, 5, L, C]`` and ``audio_later [F-1, 8, L, C]`` of the clip (official: the frame index, the
    videos being 25 fps)."""
    from svi_jax.data.audio import FPS, audio_windows
    from svi_jax.data.builder import npy_from_bytes

    start = int(round(start_frame * FPS / fps)) if fps else start_frame
    first, later = audio_windows(npy_from_bytes(audio), start, num_frames)
    return {"audio_first": first.astype(np.float32), "audio_later": later.astype(np.float32)}


def make_loader(source, config=None, **kwargs) -> ClipLoader:
    """Alias of ClipLoader(source, config, ...)."""
    return ClipLoader(source, config, **kwargs)


def state_to_array(state: dict) -> np.ndarray:
    """The state as int64 [9] (for checkpoint formats that want arrays); inverse: state_from_array."""
    return np.array([state["version"], state["position"], state["seed"], state["num_examples"],
                     state["host_id"], state["num_hosts"], state["batch_size"], int(state["shuffle"]),
                     {"clips": 0, "latents": 1}.get(state["kind"], -1)], np.int64)


def state_from_array(a) -> dict:
    a = [int(x) for x in np.asarray(a).reshape(-1)]
    return {"version": a[0], "position": a[1], "seed": a[2], "num_examples": a[3], "host_id": a[4],
            "num_hosts": a[5], "batch_size": a[6], "shuffle": bool(a[7]),
            "kind": {0: "clips", 1: "latents"}.get(a[8], "base")}

