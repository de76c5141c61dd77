"""The one-accelerator check: ``python -m bench.device [--tiny] [--out bench/device]``.

Measures, on the first local device (planned for one H100/H200, <= 8 minutes):

0. parity of the fused kernel (cuDNN on GPU, splash on TPU) against a float32 reference on this device: self-
   attention at 1,950 tokens, cross-attention to 257 and 512 keys, a ragged key length (``kv_len``), batch 2,
   values and gradients (relative error), so a fast kernel is also shown to be exact;
1. attention forward and forward+backward at ``[1, 32760, 40, 128]`` bf16: the platform's fused kernel (cuDNN on
   GPU, splash on TPU), ``flash`` (blockwise JAX) and ``xla`` (a dense score matrix: 171.7 GB fp32, expected to run
   out of memory; recorded as a failure, not a crash);
2. the full-width Wan 14B DiT (dim 5120, 40 heads, ffn 13824) with 2 scanned layers, LoRA r128, latents
   21x60x104 (32,760 tokens): the ERFT train step exactly as the trainer builds it
   (``svi_jax.train.sharded_train_step``) for each remat policy (time and ``memory_analysis``), extrapolated to 40
   layers (``x 20``; the embeddings/head are < 1%), with the MFU against the chip's bf16 peak; and one sampling
   step (DiT forward) at batch 2 (classifier-free guidance's two branches);
3. one ERFT bank insert into a full grid at K=500 with the real entry size (``[21, 60, 104, 16]`` bf16);
4. Wan VAE encode of 81x480x832 in bf16 (random weights: the cost does not depend on them).

``--tiny`` runs the same code at toy sizes on any machine (the tests run it so it never rots); its numbers mean
nothing. Every measurement that fails (out of memory, a kernel not available on this platform) is recorded with
its error's first line and the run continues. Output: ``OUT/<tag>.json`` and ``OUT/<tag>.md`` (tag: ``tiny`` or
the device kind). Results measured on a GPU are committed under ``bench/device/``; see docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "h800": 989.0, "a100": 312.0, "v5p": 459.0, "v5e": 197.0,
                    "v5 lite": 197.0, "v4": 275.0, "v6": 918.0}
REMAT = ("full", "save_attention", "offload_attention")
FULL = dict(attn=(1, 32760, 40, 128), dim=5120, heads=40, ffn=13824, layers=2, rank=128, latent=(21, 60, 104),
            text_len=512, text_dim=4096, image_dim=1280, capacity=500, video=(81, 480, 832), reps=3,
            vae=dict(base_dim=96, z_dim=16))
PARITY = dict(full=dict(B=2, L=1950, H=4, D=128, keys=(257, 512)), tiny=dict(B=2, L=45, H=2, D=32, keys=(17,)))
TINY = dict(attn=(1, 200, 2, 32), dim=64, heads=2, ffn=128, layers=2, rank=4, latent=(3, 8, 8), text_len=16,
            text_dim=32, image_dim=32, capacity=8, video=(5, 32, 32), reps=1, vae=dict(base_dim=8, z_dim=16))


def peak_tflops(kind: str):
    kind = kind.lower()
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in kind:
            return v
    return None


def _block(x):
    import jax

    return jax.block_until_ready(x)


def timed(fn, reps: int) -> dict:
    """Compile + first run, then the median of ``reps`` runs (seconds)."""
    t0 = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _block(fn())
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"first_s": first, "median_s": ts[len(ts) // 2]}


_RUN = {"deadline": None, "save": None}   # set by main(): a time limit for starting measurements, a saver


def guarded(name: str, fn, results: dict):
    """Run one measurement; a failure (e.g. out of memory) is recorded, not raised. Past ``--deadline_s`` a
    measurement is recorded as skipped; after each one the report so far is written (a run cut short keeps it)."""
    t0 = time.perf_counter()
    if _RUN["deadline"] is not None and t0 > _RUN["deadline"]:
        results[name] = {"status": "skipped", "error": "skipped: --deadline_s reached", "wall_s": 0.0}
        print(f"  {name}: skipped (deadline)", flush=True)
        return
    try:
        results[name] = dict(fn(), status="ok")
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
        oom = bool(re.search(r"RESOURCE_EXHAUSTED|out of memory|Out of memory|OOM", str(e)))
        results[name] = {"status": "failed", "error": f"{type(e).__name__}: {msg}", "out_of_memory": oom,
                         "trace_tail": traceback.format_exc()[-800:]}
    results[name]["wall_s"] = time.perf_counter() - t0
    print(f"  {name}: {results[name]['status']} ({results[name]['wall_s']:.1f} s)", flush=True)
    if _RUN["save"] is not None:
        try:
            _RUN["save"]()
        except Exception as e:  # noqa: BLE001 - a failed partial save must not end the run
            print(f"  (partial report not written: {e})", flush=True)


# ------------------------------------------------------------------------------------------------ parts


def parity_part(kernel: str, tiny: bool, results):
    """The fused kernel in bf16 against float32 ``xla`` attention (small lengths, so the dense reference fits):
    max |err| / max |ref| of the output and of dq, dk, dv."""
    import jax
    import jax.numpy as jnp

    from svi_jax.models.attention_kernels import cudnn_attention, splash_attention
    from svi_jax.models.layers import attention

    P = PARITY["tiny" if tiny else "full"]
    B, L, H, D = P["B"], P["L"], P["H"], P["D"]

    def fused(q, k, v, kv_len=None):
        if kernel == "cudnn":
            return cudnn_attention(q, k, v, kv_len=kv_len)
        if kernel == "splash":
            return splash_attention(q, k, v, kv_len=kv_len)
        return attention(q, k[:, :kv_len], v[:, :kv_len], kernel)

    def ref(q, k, v, kv_len=None):
        f = lambda t: t.astype(jnp.float32)  # noqa: E731
        return attention(f(q), f(k)[:, :kv_len], f(v)[:, :kv_len], "xla")

    def rel(a, b):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))

    cases = [("self", L, None)] + [(f"cross{n}", n, None) for n in P["keys"]] + [("ragged", L, L - 37)]
    for name, lk, kv_len in cases:
        def one(lk=lk, kv_len=kv_len):
            ks = jax.random.split(jax.random.key(lk), 4)
            q = jax.random.normal(ks[0], (B, L, H, D), jnp.bfloat16)
            k, v = (jax.random.normal(kk, (B, lk, H, D), jnp.bfloat16) for kk in ks[1:3])
            w = jax.random.normal(ks[3], (B, L, H, D), jnp.float32)
            loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, kv_len).astype(jnp.float32) * w)  # noqa: E731
            o = jax.jit(fused, static_argnums=3)(q, k, v, kv_len)
            g = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
            with jax.default_matmul_precision("highest"):   # no TF32 in the reference on GPU
                o_ref = jax.jit(ref, static_argnums=3)(q, k, v, kv_len)
                g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
            out = {"out_rel_err": rel(o, o_ref)}
            out.update({f"d{n}_rel_err": rel(a, b) for n, a, b in zip("qkv", g, g_ref)})
            out["max_rel_err"] = max(out.values())
            return out

        guarded(f"parity/{kernel}/{name}", one, results)


def attention_part(S, impls, reps, results):
    import jax
    import jax.numpy as jnp

    from svi_jax.models.layers import attention

    B, L, H, D = S["attn"]
    dt = jnp.bfloat16
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, L, H, D), dt) for kk in ks)
    fwd_flops = 4.0 * B * H * L * L * D
    for impl in impls:
        f = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, impl))
        g = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(attention(q, k, v, impl).astype(jnp.float32)),
                             argnums=(0, 1, 2)))
        guarded(f"attention/{impl}/forward", lambda f=f: dict(timed(lambda: f(q, k, v), reps), flops=fwd_flops),
                results)
        # forward + backward with recomputed scores: 3.5x the forward's matmul FLOPs
        guarded(f"attention/{impl}/forward_backward",
                lambda g=g: dict(timed(lambda: g(q, k, v), reps), flops=3.5 * fwd_flops), results)


def dit_config(S, policy: str, layers: int):
    from svi_jax.plan import load_config

    config = load_config(os.path.join(REPO, "configs", "shot.py"), [])
    F, Hl, Wl = S["latent"]
    config.model.update(num_layers=layers, dim=S["dim"], num_heads=S["heads"], ffn_dim=S["ffn"],
                        text_len=S["text_len"], text_dim=S["text_dim"], image_dim=S["image_dim"],
                        remat_policy=policy)
    config.data.update(num_frames=1 + 4 * (F - 1), height=8 * Hl, width=8 * Wl)
    config.lora.update(rank=S["rank"], alpha=S["rank"])
    config.erft.update(capacity=2, num_grids=2)   # the banks' own cost is part 3
    config.mesh.update({"data": 1, "fsdp": 1, "context": 1, "tensor": 1})
    return config


def _batch(config, S, b: int):
    import jax.numpy as jnp

    from svi_jax import train

    F, H, W, C = train.latent_shape(config)
    batch = {"latents": jnp.zeros((b, F, H, W, C)), "context": jnp.zeros((b, S["text_len"], S["text_dim"])),
             "y": jnp.zeros((b, F, H, W, C + 4)), "clip_fea": jnp.zeros((b, 257, S["image_dim"]))}
    return batch


def train_step_part(S, reps, results, peak, policies=REMAT):
    import jax

    from svi_jax import sharding, train
    from svi_jax.models.dit import DiTConfig, init_params
    from svi_jax.conditioners import LatentConditioner
    from svi_jax.plan import analytic_flops

    for policy in policies:
        def one(policy=policy):
            config = dit_config(S, policy, S["layers"])
            cond = LatentConditioner(config)
            mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
            params = {"dit": init_params(DiTConfig.from_dict(config.model.to_dict()), jax.random.key(0))}
            built = train.build(config, mesh, conditioner=cond, params=params, init_key=jax.random.key(1))
            state, step = built.state, built.step
            batch = _batch(config, S, 1)
            compiled = step.lower(state, batch).compile()
            mem = compiled.memory_analysis()
            box = {"state": state}

            def run():
                box["state"], m = compiled(box["state"], batch)
                return m["loss"]

            out = timed(run, reps)
            F, H, W, _ = train.latent_shape(config)
            cfg40 = DiTConfig.from_dict(dict(config.model.to_dict(), num_layers=40))
            lora_params = sum(int(a.size) for a in jax.tree.leaves(box["state"]["lora"])) // S["layers"] * 40
            ana = analytic_flops(cfg40, (F, H, W), 1, S["text_len"], policy != "none", S["rank"], lora_params)
            t40 = out["median_s"] * 40 / S["layers"]
            out.update(temp_gb=mem.temp_size_in_bytes / 1e9, argument_gb=mem.argument_size_in_bytes / 1e9,
                       peak_gb=(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                + mem.temp_size_in_bytes) / 1e9,
                       step_s_40_layers=t40, analytic_step_flops_40_layers=ana["step"],
                       mfu_40_layers=(ana["step"] / t40 / (peak * 1e12)) if peak else None)
            return out

        guarded(f"train_step/{policy}", one, results)


def sample_step_part(S, reps, results, peak):
    import jax
    import jax.numpy as jnp

    from svi_jax.models.dit import DiTConfig, WanDiT, flops_per_forward, init_params

    def one():
        config = dit_config(S, "none", S["layers"])
        cfg = DiTConfig.from_dict(config.model.to_dict())
        params = init_params(cfg, jax.random.key(0))
        F, H, W = S["latent"]
        x = jnp.zeros((2, F, H, W, 16), jnp.bfloat16)
        y = jnp.zeros((2, F, H, W, 20), jnp.bfloat16)
        ctx = jnp.zeros((2, S["text_len"], S["text_dim"]), jnp.bfloat16)
        clip = jnp.zeros((2, 257, S["image_dim"]), jnp.bfloat16)
        f = jax.jit(lambda p, x, t: WanDiT(cfg).apply({"params": p}, x, t, ctx, clip_fea=clip, y=y))
        t = jnp.full((2,), 500.0)
        out = timed(lambda: f(params, x, t), reps)
        flops40 = flops_per_forward(DiTConfig.from_dict(dict(cfg.to_dict(), num_layers=40)), (F, H, W), batch=2)
        t40 = out["median_s"] * 40 / S["layers"]
        out.update(step_s_40_layers=t40, clip_s_50_steps_40_layers=50 * t40,
                   mfu_40_layers=(flops40 / t40 / (peak * 1e12)) if peak else None)
        return out

    guarded("sample_step/batch2", one, results)


def bank_part(S, reps, results):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from svi_jax import erft

    def one():
        F, H, W = S["latent"]
        shape = (F, H, W, 16)
        bank = erft.init_bank(1, S["capacity"], shape, jnp.bfloat16)
        bank = bank._replace(count=jnp.array([S["capacity"]], jnp.int32))   # a full grid: nearest-neighbour scan
        e = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
        ins = jax.jit(erft.insert, donate_argnums=0)
        box = {"bank": bank}

        def run():
            box["bank"] = ins(box["bank"], 0, e)
            return box["bank"].count

        return dict(timed(run, reps), bank_gb=S["capacity"] * int(np.prod(shape)) * 2 / 1e9)

    guarded(f"bank_insert/K{S['capacity']}", one, results)


def vae_part(S, reps, results):
    import jax
    import jax.numpy as jnp

    from svi_jax.models import vae

    def one():
        cfg = vae.wan21_config(dtype="bfloat16", **({} if S is FULL else S["vae"]))
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), vae.init_params(cfg))
        T, H, W = S["video"]
        video = jnp.zeros((1, T, H, W, 3), jnp.bfloat16)
        f = jax.jit(lambda p, v: vae.encode_video(p, v, cfg=cfg))
        return timed(lambda: f(params, video), max(1, reps - 1))

    guarded(f"vae_encode/{'x'.join(map(str, S['video']))}", one, results)


# ------------------------------------------------------------------------------------------------ report


def to_markdown(report: dict) -> str:
    size = ", tiny sizes" if report["tiny"] else ""
    lines = [f"# Device check: {report['device_kind']} ({report['platform']}{size})",
             "", f"jax {report['jax']}, peak bf16 {report['peak_bf16_tflops']} TFLOP/s, total {report['wall_s']:.0f} s",
             "", "| measurement | status | median s | first (compile) s | extra |", "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | **{r['status']}** | | | {r['error'][:160]} |")
            continue
        extra = []
        for k in ("peak_gb", "temp_gb", "step_s_40_layers", "mfu_40_layers", "clip_s_50_steps_40_layers", "bank_gb"):
            if r.get(k) is not None:
                extra.append(f"{k} {r[k]:.3g}")
        for k in ("max_rel_err",):
            if r.get(k) is not None:
                extra.append(f"{k} {r[k]:.2g}")
        if r.get("flops"):
            extra.append(f"TFLOP/s {r['flops'] / r['median_s'] / 1e12:.3g}")
        med, first = (f"{r[k]:.4g}" if k in r else "" for k in ("median_s", "first_s"))
        lines.append(f"| {name} | ok | {med} | {first} | {', '.join(extra)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes (any machine, the numbers mean nothing)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "device"), help="folder for <tag>.json / .md")
    p.add_argument("--only", default="", help="comma list of parts: parity,attention,train,sample,bank,vae")
    p.add_argument("--deadline_s", type=float, default=None,
                   help="start no measurement after this many seconds (the rest are recorded as skipped)")
    p.add_argument("--remat", default=",".join(REMAT), help="remat policies of the train step (comma list)")
    args = p.parse_args(argv)
    import jax

    from svi_jax.models.attention_kernels import backend_kernel

    S = TINY if args.tiny else FULL
    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind)
    parts = set(args.only.split(",")) if args.only else {"parity", "attention", "train", "sample", "bank", "vae"}
    fused = {"splash": "splash", "cudnn": "cudnn"}.get(backend_kernel(dev.platform), "per_head")
    results: dict = {}
    t0 = time.perf_counter()
    tag = "tiny" if args.tiny else re.sub(r"[^a-z0-9]+", "_", dev.device_kind.lower()).strip("_")
    report = {"device_kind": dev.device_kind, "platform": dev.platform, "tiny": bool(args.tiny),
              "jax": jax.__version__, "peak_bf16_tflops": peak, "sizes": copy.deepcopy(S), "results": results,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)

    def save(final: bool = False):
        report.update(wall_s=time.perf_counter() - t0, complete=final)
        with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
            f.write(to_markdown(report))

    _RUN.update(save=save, deadline=None if args.deadline_s is None else t0 + args.deadline_s)
    print(f"device check on {dev.device_kind} ({dev.platform}), sizes {'tiny' if args.tiny else 'full'}", flush=True)
    if "parity" in parts:
        parity_part(fused, bool(args.tiny), results)
    if "attention" in parts:
        attention_part(S, (fused, "flash", "xla"), S["reps"], results)
    if "train" in parts:
        train_step_part(S, S["reps"], results, peak, [x for x in args.remat.split(",") if x])
    if "sample" in parts:
        sample_step_part(S, S["reps"], results, peak)
    if "bank" in parts:
        bank_part(S, S["reps"], results)
    if "vae" in parts:
        vae_part(S, S["reps"], results)
    _RUN.update(save=None, deadline=None)
    save(final=True)
    print(to_markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
