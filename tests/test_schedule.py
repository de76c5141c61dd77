"""Per-clip schedules (``--schedule``): parsing and validation errors naming the line and field, inheritance from
the flags, a generation whose clips change prompt/seed/steps/CFG/LoRA (each clip equals that clip sampled by hand),
merges cached per LoRA set, resume with a schedule and a changed schedule rejected on resume.

Reuses the tiny models of ``tests/test_sample.py`` (its module-scoped ``env`` fixture)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from svi_jax import sample as S
from svi_jax import schedule as SC
from tests.test_sample import ROOT, STEPS, T, env  # noqa: F401 (the fixture)

D = SC.Defaults(prompt=None, negative_prompt="neg", seed=10, seed_times=42, steps=7, cfg_scale=5.0,
                solver="euler", loras=(), motion_frames=1)


def _parse(text, source="s.jsonl", defaults=D, **kw):
    return SC.parse(text, defaults, source, **kw)


# ------------------------------------------------------------------------------------------------ parsing


def test_inheritance_and_both_formats(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    jsonl = ('# a comment\n{"prompt": "a boat"}\n\n{"prompt": "a cat", "seed": 5, "steps": 3, "cfg_scale": 1, '
             '"solver": "unipc", "negative_prompt": "", "loras": [{"path": "style.safetensors", "strength": 0.5}]}\n'
             '{"prompt": "a dog", "num_steps": 2, "loras": ["style.safetensors:0.25"], "motion_frames": 1}\n')
    yaml = ("- prompt: a boat\n"
            "- prompt: a cat\n  seed: 5\n  steps: 3\n  cfg_scale: 1\n  solver: unipc\n  negative_prompt: ''\n"
            "  loras:\n    - {path: style.safetensors, strength: 0.5}\n"
            "- {prompt: a dog, num_steps: 2, loras: ['style.safetensors:0.25'], motion_frames: 1}\n")
    a = _parse(jsonl, str(tmp_path / "s.jsonl"), base_dir=str(tmp_path)).clips
    b = _parse(yaml, str(tmp_path / "s.yaml"), base_dir=str(tmp_path)).clips
    y2 = SC.parse("clips:\n" + "".join("  " + ln + "\n" for ln in yaml.splitlines()), D, "s.yml",
                  base_dir=str(tmp_path)).clips
    assert [c.line for c in a] == [2, 4, 5] and [c.line for c in b] == [1, 2, 10]
    for clips in (a, b, y2):
        c0, c1, c2 = clips
        assert (c0.prompt, c0.negative_prompt, c0.seed, c0.steps, c0.cfg_scale, c0.solver, c0.loras) == \
            ("a boat", "neg", 10, 7, 5.0, "euler", ())                                  # all inherited
        assert (c1.prompt, c1.negative_prompt, c1.seed, c1.steps, c1.cfg_scale, c1.solver) == \
            ("a cat", "", 5, 3, 1.0, "unipc")
        assert c1.loras == ((str(lora), 0.5),)                    # relative to the schedule file
        assert c2.seed == 10 + 2 * 42 and c2.steps == 2 and c2.loras == ((str(lora), 0.25),)
    # --prompt and --prompt_prefix, flag LoRAs inherited
    d = SC.Defaults(prompt="default p", prompt_prefix="film", loras=((str(lora), 1.0),))
    c = SC.parse('{"seed": 1}\n{"prompt": "x", "loras": []}\n', d, "p.jsonl").clips
    assert [x.prompt for x in c] == ["film, default p", "film, x"] and c[0].loras == ((str(lora), 1.0),)
    assert c[1].loras == ()
    s = SC.parse('{"seed": 1}\n{"prompt": "x", "loras": []}\n', d, "p.jsonl")
    assert s.needs_base and s.sha256 != SC.parse('{"seed": 2}\n{"prompt": "x"}\n', d, "p.jsonl").sha256


@pytest.mark.parametrize("text,source,line,field,msg", [
    ('{"prompt": "a"}\n{"prompt": "b", "cfg_scale": "high"}\n', "s.jsonl", 2, "cfg_scale", "expected a number"),
    ('{"prompt": "a"}\n\n{"promt": "b"}\n', "s.jsonl", 3, "promt", "did you mean 'prompt'"),
    ('{"prompt": "a", "keyframe": "end.png"}\n', "s.jsonl", 1, "keyframe", "keyframes are not supported"),
    ('{"prompt": "a"}\n{"prompt": "b", "motion_frames": 5}\n', "s.jsonl", 2, "motion_frames",
     "cannot vary per clip"),
    ('{"prompt": "a"}\n{"prompt": "b",\n', "s.jsonl", 2, None, "not valid JSON"),
    ('{"seed": 1}\n', "s.jsonl", 1, "prompt", "missing"),
    ('{"prompt": "a", "solver": "dpm"}\n', "s.jsonl", 1, "solver", "euler, unipc"),
    ('{"prompt": "a", "steps": 0}\n', "s.jsonl", 1, "steps", ">= 1"),
    ('{"prompt": "a", "seed": 1.5}\n', "s.jsonl", 1, "seed", "expected an integer"),
    ('{"prompt": "a", "loras": [{"path": "nope.safetensors"}]}\n', "s.jsonl", 1, "loras[0].path", "does not exist"),
    ('{"prompt": "a", "loras": [{"path": "x", "weight": 1}]}\n', "s.jsonl", 1, "loras[0].weight", "unknown key"),
    ("- prompt: a\n- prompt: b\n  cfg_scale: [1]\n", "s.yaml", 3, "cfg_scale", "expected a number"),
    ("- prompt: a\n-   prompt: b\n    last_frame: z.png\n", "s.yaml", 3, "last_frame", "keyframes"),
    ("- prompt: a\n- prompt: [unclosed\n", "s.yaml", 3, None, "not valid YAML"),
    ("prompt: a\n", "s.yaml", 1, None, "expected a list of clips"),
    ("", "s.yaml", None, None, "no clips"),
])
def test_errors_name_the_line_and_field(text, source, line, field, msg, tmp_path):
    with pytest.raises(SC.ScheduleError) as e:
        _parse(text, source, base_dir=str(tmp_path))
    m = str(e.value)
    assert "\n" not in m and msg in m, m
    if line is not None:
        assert f"schedule {source} line {line}" in m, m
    if field is not None:
        assert f"field '{field}'" in m, m


# ------------------------------------------------------------------------------------------------ generation


def _lora_file(env, path):
    from svi_jax import lora as lora_lib
    from svi_jax.model_dirs import flatten, unflatten

    s = env["shot"]
    fl = flatten(lora_lib.init_lora(s.params, jax.random.key(5), rank=4))
    lo = unflatten({k: (0.2 * jax.random.normal(jax.random.key(len(k)), v.shape) if k.endswith("/b") else v)
                    for k, v in fl.items()})
    return lora_lib.save(lo, str(path))


@pytest.fixture(scope="module")
def sched_env(env):
    d = env["dir"]
    lora = _lora_file(env, d / "style.safetensors")
    text = ('{"prompt": "the red boat sails"}\n'
            '{"prompt": "a cat", "seed": 1234, "steps": 2, "cfg_scale": 1.0, "loras": [{"path": "style.safetensors", '
            '"strength": 0.7}]}\n'
            '{"prompt": "a cat", "seed": 99, "loras": [{"path": "style.safetensors", "strength": 0.7}]}\n')
    (d / "sched.jsonl").write_text(text)
    defaults = SC.Defaults(prompt=None, negative_prompt=env["shot"].negative_prompt, seed=0, steps=STEPS,
                           cfg_scale=5.0, solver="euler", motion_frames=1)
    plan = SC.load(str(d / "sched.jsonl"), defaults, resolve=S.resolve_lora)
    sampler = S.LongVideoSampler(env["config"], num_steps=STEPS, cfg_scale=5.0, keep_base=True)
    return dict(lora=lora, plan=plan, sampler=sampler, defaults=defaults)


def test_scheduled_clips_equal_each_clip_sampled_by_hand(env, sched_env, tmp_path):
    s, plan, ref = sched_env["sampler"], sched_env["plan"], env["ref"]
    runner = plan.runner(s)
    summary = S.generate(s, ref, plan.prompts, str(tmp_path / "sch.mp4"), lossless=True, progress=False,
                         inputs=plan.inputs(), clip_setup=runner)
    runner.restore()
    got = S.Output(str(tmp_path / "sch.mp4")).read_lossless()
    assert got.shape[0] == 3 * (T - 1) + 1 and runner.merges == 1        # clip 3 reuses clip 2's merge
    # clip 1 (everything inherited) = the same clip of a run without a schedule
    plain = S.generate(env["shot"], ref, ["the red boat sails", "x"], str(tmp_path / "plain.mp4"), lossless=True,
                       progress=False)
    plain_frames = S.Output(str(tmp_path / "plain.mp4")).read_lossless()
    np.testing.assert_array_equal(got[:T - 1], plain_frames[:T - 1])
    assert not np.array_equal(got[T - 1:2 * (T - 1)], plain_frames[T - 1:2 * (T - 1)])
    # clips 2 and 3 by hand: the LoRA merged at 0.7; clip 2 at 2 steps without CFG, clip 3 at the flags' 3 and CFG 5
    from svi_jax.lora_formats import LoraSpec, merge_stack

    merged = merge_stack(s.base_params, [LoraSpec(sched_env["lora"], 0.7)])
    two = S.LongVideoSampler(env["config"], num_steps=2, cfg_scale=1.0, dit_params=merged)
    three = S.LongVideoSampler(env["config"], num_steps=STEPS, cfg_scale=5.0, dit_params=merged)
    state = s.initial_state(ref)
    y, clip = s.conditioning(state, ref)
    f1 = s.decode(s.sample("the red boat sails", y, clip, 0))
    np.testing.assert_array_equal(got[:T - 1], f1[:T - 1])
    state = s.next_state(state, f1, None)
    y, clip = two.conditioning(state, ref)
    f2 = two.decode(two.sample("a cat", y, clip, 1234))
    np.testing.assert_array_equal(got[T - 1:2 * (T - 1)], f2[:T - 1])
    state = s.next_state(state, f2, None)
    y, clip = three.conditioning(state, ref)
    f3 = three.decode(three.sample("a cat", y, clip, 99))
    np.testing.assert_array_equal(got[2 * (T - 1):], f3)
    side = json.load(open(tmp_path / "sch.json"))
    assert [c["seed"] for c in side["clips"]] == [0, 1234, 99]
    assert [(c["steps"], c["cfg_scale"], c["schedule_line"]) for c in side["clips"]] == \
        [(STEPS, 5.0, 1), (2, 1.0, 2), (STEPS, 5.0, 3)]
    assert side["clips"][1]["loras"] == [{"path": sched_env["lora"], "strength": 0.7}]
    assert side["settings"]["schedule"]["sha256"] == plan.sha256
    assert summary["num_clips"] == 3
    # the sampler is back at the flags' settings
    assert (s.num_steps, s.cfg_scale) == (STEPS, 5.0) and s.params is runner.initial[-1]


def _cli(env, out, sched, *extra):
    cmd = [sys.executable, "-m", "svi_jax.sample", f"--config={env['cfg_path']}", f"--image={env['dir'] / 'ref.png'}",
           f"--schedule={sched}", f"--out={out}", f"--num_steps={STEPS}", "--lossless", "--noprogress", *extra]
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(env["dir"] / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


def _one_error_line(p, *needles):
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("error: ") and all(n in last for n in needles), p.stderr[-3000:]


def test_cli_resume_with_a_schedule(env, sched_env, tmp_path):
    """Clip 1 of the schedule, then --resume for the rest: the API's uninterrupted video; a changed schedule is
    rejected on resume; a bad schedule fails with one line naming the line and field."""
    sched = tmp_path / "sched.jsonl"
    sched.write_text((env["dir"] / "sched.jsonl").read_text())
    (tmp_path / "style.safetensors").write_bytes(open(sched_env["lora"], "rb").read())
    out = str(tmp_path / "cli.mp4")
    p = _cli(env, out, sched, "--num_clips=1")
    assert p.returncode == 0, p.stderr[-3000:]
    p = _cli(env, out, sched, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["clips"] == 3
    s, plan = sched_env["sampler"], sched_env["plan"]
    runner = plan.runner(s)
    S.generate(s, env["ref"], plan.prompts, str(tmp_path / "api.mp4"), lossless=True, progress=False,
               clip_setup=runner)
    runner.restore()
    np.testing.assert_array_equal(S.Output(out).read_lossless(), S.Output(str(tmp_path / "api.mp4")).read_lossless())
    sched.write_text(sched.read_text().replace('"seed": 99', '"seed": 98'))
    _one_error_line(_cli(env, out, sched, "--resume"), "schedule changed", "--overwrite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- prompt: a\n- prompt: b\n  keyframe: end.png\n")
    _one_error_line(_cli(env, str(tmp_path / "bad.mp4"), bad), "line 3", "'keyframe'", "not supported")


def test_demo_runner_runs_a_pasted_schedule(env, tmp_path):
    """The demo's job runner takes the same schedule path: per-clip seed/steps/CFG, the sampler restored after."""
    pytest.importorskip("starlette")
    from svi_jax.demo.jobs import Job, SamplerRunner

    runner = SamplerRunner(lambda on_step: S.LongVideoSampler(env["config"], num_steps=STEPS, cfg_scale=5.0,
                                                             on_step=on_step))
    job = Job(str(tmp_path), ["the red boat sails", "a cat"], 0, "reference.png",
              schedule='{"prompt": "the red boat sails"}\n{"prompt": "a cat", "seed": 1234, "steps": 2, '
                       '"cfg_scale": 1}\n')
    shutil.copy(env["dir"] / "ref.png", job.image_path)
    runner(job)
    side = json.load(open(tmp_path / "out.json"))
    assert [(c["seed"], c["steps"], c["cfg_scale"]) for c in side["clips"]] == [(0, STEPS, 5.0), (1234, 2, 1.0)]
    assert len(job.clips) == 2 and (runner.sampler.num_steps, runner.sampler.cfg_scale) == (STEPS, 5.0)


def test_expert_pair_fields_for_chain_pro(tmp_path):
    """--chain pro schedules: lora_high / lora_low per clip (omitted = the flags' pair, null = none), 'loras'
    refused and never ignored; the pair fields are refused without --chain pro."""
    from svi_jax import schedule as sch

    (tmp_path / "h.safetensors").write_bytes(b"x")
    pair = sch.Defaults(prompt="p", loras=(("", 1.0), ("/flags/low.safetensors", 0.7)), expert_pair=True)
    text = '{"prompt": "a"}\n{"lora_high": "h.safetensors:0.5", "lora_low": null}\n'
    clips = sch.parse(text, pair, "s.jsonl", str(tmp_path)).clips
    assert clips[0].loras == (("", 1.0), ("/flags/low.safetensors", 0.7))
    assert clips[1].loras == ((str(tmp_path / "h.safetensors"), 0.5), ("", 1.0))
    rec = clips[1].record()
    assert rec["lora_high"] == {"path": str(tmp_path / "h.safetensors"), "strength": 0.5} and rec["lora_low"] is None
    assert "loras" not in rec
    with pytest.raises(sch.ScheduleError, match="line 1, field 'loras': pair please"):
        sch.parse('{"loras": []}\n', pair, "s.jsonl", str(tmp_path), loras_refused="pair please")
    with pytest.raises(sch.ScheduleError, match="field 'loras'"):
        sch.parse('{"loras": []}\n', pair, "s.jsonl", str(tmp_path))
    with pytest.raises(sch.ScheduleError, match="did you mean 'lora_low'"):
        sch.parse('{"lora_lo": "h.safetensors"}\n', pair, "s.jsonl", str(tmp_path))
    with pytest.raises(sch.ScheduleError, match="--chain pro only"):
        sch.parse('{"lora_high": "h.safetensors"}\n', sch.Defaults(prompt="p"), "s.jsonl", str(tmp_path))
