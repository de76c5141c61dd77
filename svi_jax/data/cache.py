"""Latent cache: encode sampled training windows once, then train on stored tensors.

Layout of a cache folder:
  cache_info.json                          what is stored (shapes, dtypes, data config, encoders, counts)
  latents-SSSSS-of-NNNNN.array_record      records of shard S (videos S, S+N, S+2N, ...; `windows` each)
  latents-SSSSS-of-NNNNN.json              written when shard S is complete
Shards can be written by separate processes/hosts (shard = host_id, num_shards = num_hosts).

Window w of video i is exactly what ClipLoader yields for video i in epoch w (same seed), so a cache with
W windows replays the first W epochs of pixel training; LatentLoader serves window (epoch mod W) of
each video per epoch. Records are a small self-describing binary format (JSON header + raw arrays,
bfloat16 via ml_dtypes), one record per (video, window).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from typing import Callable, Optional

import numpy as np

from svi_jax.data import config as config_lib
from svi_jax.data.loader import BatchIterator, ClipLoader

MAGIC = b"SVIC"
FORMAT = "svi_latent_cache"
FORMAT_VERSION = 1
INFO_FILE = "cache_info.json"


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def pack(record: dict) -> bytes:
    """dict of numpy arrays / scalars / str -> bytes (JSON header + concatenated raw buffers)."""
    header, chunks, offset = {}, [], 0
    for k, v in record.items():
        if isinstance(v, str):
            header[k] = {"str": v}
            continue
        a = np.asarray(v)  # tobytes() is C order; ascontiguousarray would make scalars 1-d
        raw = a.tobytes()
        header[k] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset, "nbytes": len(raw)}
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return MAGIC + struct.pack("<I", len(h)) + h + b"".join(chunks)


def unpack(data: bytes) -> dict:
    if data[:4] != MAGIC:
        raise ValueError("not a latent-cache record (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    body = memoryview(data)[8 + n:]
    out = {}
    for k, m in header.items():
        if "str" in m:
            out[k] = m["str"]
        else:
            out[k] = np.frombuffer(body[m["offset"]:m["offset"] + m["nbytes"]], _dtype(m["dtype"])).reshape(tuple(m["shape"]))
    return out


@dataclasses.dataclass
class Encoders:
    """The models as host callables (numpy/jax arrays in, arrays out). Tests pass simple stand-ins.

    video: [B, T, H, W, 3] in [-1, 1] -> normalised latents [B, F, h, w, z].
    text: list of captions -> emb [B, L, D] or (emb, mask [B, L]); rows past each caption's length are
      dropped when stored and come back as zeros (the official zero padding).
    image: optional (I2V) [B, H, W, 3] in [-1, 1] -> CLIP tokens [B, N, D].
    cond: optional (cond [B, T, H, W, 3], num_cond [B]) -> y; default for I2V: mask ++ video(cond)
      (svi_jax.conditioning.build_y's layout, computed in numpy).
    description: JSON-able facts about the encoders, kept in cache_info.json.
    """

    video: Callable
    text: Callable
    image: Optional[Callable] = None
    cond: Optional[Callable] = None
    description: dict = dataclasses.field(default_factory=dict)

    @property
    def i2v(self) -> bool:
        return self.image is not None


def _default_y(encoders: Encoders, cond: np.ndarray, num_frames: int) -> np.ndarray:
    from svi_jax.conditioning import i2v_mask

    z = np.asarray(encoders.video(cond), np.float32)
    mask = i2v_mask(num_frames, z.shape[2], z.shape[3])
    return np.concatenate([np.broadcast_to(mask, (z.shape[0],) + mask.shape), z], axis=-1)


def shard_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}"


def write_cache(dataset, out: str, encoders: Encoders, config=None, *, windows: int = 1,
                batch_size: int = 1, dtype: str = "bfloat16", shard: int = 0, num_shards: int = 1,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Encode `windows` sampled windows of every video of shard `shard` and write them under `out`.

    dataset: a build folder (or random-access source) as ClipLoader takes; config: the data config
    (window size, motion frames, padding, seed). Returns the cache info (also in cache_info.json).
    """
    from tqdm import tqdm

    cfg = config if config is not None else config_lib.default_config()
    cfg = cfg.copy_and_resolve_references()
    config_lib.validate(cfg)
    if windows < 1 or batch_size < 1:
        raise ValueError("windows and batch_size must be >= 1")
    clips = ClipLoader(dataset, cfg, host_id=0, num_hosts=1, num_workers=0)
    n = clips.order.num_examples
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, shard_name(shard, num_shards))
    if os.path.exists(base + ".json") and not overwrite:
        raise FileExistsError(f"{base}.json exists: pass --overwrite to rewrite the shard")
    mine = [(i, w) for i in range(shard, n, num_shards) for w in range(windows)]
    from array_record.python.array_record_module import ArrayRecordWriter

    t0 = time.time()
    writer = ArrayRecordWriter(base + ".array_record.tmp", "group_size:1")
    shapes, text_len = {}, None
    store = _dtype(dtype)
    import concurrent.futures

    from svi_jax.data.builder import _ordered_map

    bar = tqdm(total=len(mine), desc=f"caching shard {shard}", unit="window", disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_workers)) as pool:
        examples = _ordered_map(pool, lambda iw: clips.load(iw[1], iw[0]), mine, max(2, 2 * batch_size))
        for b0 in range(0, len(mine), batch_size):
            keys = mine[b0:b0 + batch_size]
            exs = [next(examples) for _ in keys]
            video = np.stack([e["video"] for e in exs])
            lat = np.asarray(encoders.video(video), np.float32)
            txt = encoders.text([e["caption"] for e in exs])
            emb, tmask = (txt if isinstance(txt, tuple) else (txt, None))
            emb = np.asarray(emb, np.float32)
            text_len = emb.shape[1]
            lens = (np.asarray(tmask).sum(-1).astype(int) if tmask is not None
                    else np.full((len(exs),), emb.shape[1]))
            y = clip_fea = None
            if encoders.i2v:
                cond = np.stack([e["cond"] for e in exs])
                num_cond = np.array([e["num_cond"] for e in exs], np.int32)
                y = (np.asarray(encoders.cond(cond, num_cond), np.float32) if encoders.cond is not None
                     else _default_y(encoders, cond, cfg.num_frames))
                clip_fea = np.asarray(encoders.image(np.stack([e["first_frame"] for e in exs])), np.float32)
            for j, ((i, w), e) in enumerate(zip(keys, exs)):
                rec = {"index": np.int64(i), "window": np.int32(w), "num_cond": np.int32(e["num_cond"]),
                       "caption": e["caption"], "latents": lat[j].astype(store),
                       "context": emb[j, :lens[j]].astype(store)}
                if y is not None:
                    rec["y"] = y[j].astype(store)
                    rec["clip_fea"] = clip_fea[j].astype(store)
                shapes = {k: list(np.shape(v)) for k, v in rec.items()
                          if k not in ("caption", "context") and np.ndim(v) > 0}
                shapes["context_dim"] = [int(emb.shape[-1])]
                writer.write(pack(rec))
            bar.update(len(keys))
    bar.close()
    writer.close()
    os.replace(base + ".array_record.tmp", base + ".array_record")
    info = {
        "format": FORMAT, "version": FORMAT_VERSION, "num_videos": n, "windows": windows,
        "num_shards": num_shards, "dtype": dtype, "text_len": int(text_len or 0), "shapes": shapes,
        "i2v": encoders.i2v, "data": {k: cfg[k] for k in ("num_frames", "height", "width", "frame_stride",
                                                          "num_motion_frames", "p_motion", "pad_mode", "seed")},
        "encoders": encoders.description,
        "dataset": os.path.abspath(dataset) if isinstance(dataset, str) else repr(type(dataset)),
    }
    with open(base + ".json", "w") as f:
        json.dump({"shard": shard, "num_shards": num_shards, "records": len(mine),
                   "seconds": round(time.time() - t0, 3)}, f)
    if shard == 0:
        with open(os.path.join(out, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
    return info


def read_info(path: str) -> dict:
    p = os.path.join(path, INFO_FILE)
    if not os.path.exists(p):
        raise FileNotFoundError(f"no latent cache in {path} (missing {INFO_FILE}); run `python -m svi_jax.data cache`")
    with open(p) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(f"{p} is not a {FORMAT} file")
    return info


class LatentLoader(BatchIterator):
    """Batches from a latent cache; same order/sharding/state rules as ClipLoader (examples = videos;
    epoch e serves window e mod W of each video).

    Batch: latents [B,F,h,w,z], context [B,text_len,D] (zero rows past each caption), context_len [B],
    num_cond [B], caption [B], window [B], index [B], epoch [B]; I2V caches add y [B,F,h,w,4+z] and
    clip_fea [B,N,D]. Arrays keep the stored dtype (bfloat16 by default) unless dtype= is given.
    """

    kind = "latents"

    def __init__(self, path: str, config=None, *, host_id: Optional[int] = None,
                 num_hosts: Optional[int] = None, dtype: Optional[str] = None, **overrides):
        cfg = config if config is not None else config_lib.default_config()
        if overrides:
            cfg = cfg.copy_and_resolve_references()
            cfg.update(overrides)
        self.config = cfg
        self.info = read_info(path)
        self.path = path
        for k in ("num_frames", "height", "width"):
            if k in cfg and k in self.info["data"] and int(cfg[k]) != int(self.info["data"][k]):
                raise ValueError(f"latent cache {path} was written with {k}={self.info['data'][k]}, the config "
                                 f"asks for {cfg[k]}; rebuild the cache or change the config")
        ns = self.info["num_shards"]
        files, counts = [], []
        for s in range(ns):
            base = os.path.join(path, shard_name(s, ns))
            if not os.path.exists(base + ".json"):
                raise FileNotFoundError(f"latent cache shard {base} is incomplete (no {os.path.basename(base)}.json)")
            with open(base + ".json") as f:
                counts.append(json.load(f)["records"])
            files.append(base + ".array_record")
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.source = ArrayRecordDataSource(files)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.windows = int(self.info["windows"])
        self.text_len = int(self.info["text_len"])
        self.dtype = _dtype(dtype) if dtype else None
        super().__init__(int(self.info["num_videos"]), batch_size=cfg.batch_size, seed=cfg.seed,
                         host_id=host_id, num_hosts=num_hosts, shuffle=cfg.get("shuffle", True),
                         num_workers=cfg.get("num_workers", 2), prefetch=cfg.get("prefetch", 2))

    def record_position(self, index: int, window: int) -> int:
        ns = self.info["num_shards"]
        shard = index % ns
        return int(self._offsets[shard]) + (index // ns) * self.windows + window

    def load(self, epoch: int, index: int) -> dict:
        w = epoch % self.windows
        rec = unpack(self.source[self.record_position(index, w)])
        if int(rec["index"]) != index or int(rec["window"]) != w:
            raise RuntimeError(f"latent cache {self.path} is inconsistent: expected video {index} window {w}, "
                               f"found {int(rec['index'])}/{int(rec['window'])}")
        ctx = rec["context"]
        full = np.zeros((self.text_len, ctx.shape[-1]), self.dtype or ctx.dtype)
        full[:ctx.shape[0]] = ctx
        out = {"latents": rec["latents"], "context": full, "context_len": np.int32(ctx.shape[0]),
               "num_cond": rec["num_cond"], "caption": rec["caption"], "window": rec["window"]}
        if "y" in rec:
            out["y"], out["clip_fea"] = rec["y"], rec["clip_fea"]
        if self.dtype is not None:
            for k in ("latents", "y", "clip_fea"):
                if k in out:
                    out[k] = out[k].astype(self.dtype)
        return out


def encoders_from_checkpoints(vae: str, t5: str, clip: Optional[str] = None, tokenizer: Optional[str] = None,
                              vae_chunk: int = 1) -> Encoders:
    """Encoders backed by our converted JAX models (svi_jax.models.{vae,t5,clip})."""
    from svi_jax.models import t5 as t5_mod
    from svi_jax.models import vae as vae_mod

    v = vae_mod.VAE.from_dir(vae)
    t = t5_mod.T5Encoder.from_dir(t5, tokenizer_dir=tokenizer)

    def video(x):
        return v.normalize(np.asarray(v.encode(np.asarray(x, np.float32), chunk=vae_chunk, progress=False)))

    def text(captions):
        emb, mask = t.encode(list(captions))
        return np.asarray(emb), np.asarray(mask)

    image = None
    if clip:
        from svi_jax.models import clip as clip_mod

        c = clip_mod.CLIPVision.from_dir(clip)

        def image(x):
            return np.asarray(c.encode(np.asarray(x, np.float32)))

    desc = {"vae": os.path.abspath(vae), "t5": os.path.abspath(t5), "clip": os.path.abspath(clip) if clip else None,
            "tokenizer": tokenizer}
    return Encoders(video=video, text=text, image=image, description=desc)


def encoders_from_train_config(config) -> Encoders:
    """The encoders the trainer itself would use for `config` (checkpoints or its seeded random tiny
    encoders), via svi_jax.encoders (jitted, float32 as loaded)."""
    import jax
    import jax.numpy as jnp

    from svi_jax.encoders import make_encoders

    enc = make_encoders(config)
    enc_video, enc_text = jax.jit(enc.latents), jax.jit(enc.context)

    def video(x):
        return np.asarray(enc_video(enc.codec.params, jnp.asarray(x, jnp.float32)))

    def text(captions):
        ids, mask = enc.tokenize(captions)
        return np.asarray(enc_text(enc.t5_params, jnp.asarray(ids), jnp.asarray(mask))), np.asarray(mask)

    image = None
    if enc.clip_cfg is not None:
        enc_img = jax.jit(enc.clip_tokens)

        def image(x):
            return np.asarray(enc_img(enc.clip_params, jnp.asarray(x, jnp.float32)))

    ck = config.checkpoints
    desc = {"train_config": config.get("name", ""), "vae": ck.vae or "random", "t5": ck.t5 or "random",
            "clip": ck.clip or ("random" if image else None), "seed": int(config.train.seed)}
    return Encoders(video=video, text=text, image=image, description=desc)
