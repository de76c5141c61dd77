"""Per-clip schedules: ``python -m svi_jax.sample --schedule FILE`` (JSON Lines or YAML, one record per clip).

A record may set (every field optional; an omitted field inherits from the command's flags):

=================  ==========================================================  ==================================
field              value                                                       inherits
=================  ==========================================================  ==================================
``prompt``         non-empty text                                              ``--prompt`` (else required)
``negative_prompt`` text                                                       ``--negative_prompt``
``seed``           integer >= 0: this clip's noise seed                        ``--seed + k * --seed_times``
``steps``          integer >= 1 (``num_steps`` is accepted as an alias)        ``--num_steps``
``cfg_scale``      number >= 0                                                 ``--cfg_scale``
``solver``         ``euler`` or ``unipc``                                      ``--solver``
``loras``          list of ``{path, strength}`` (or ``"PATH[:S]"`` strings),   ``--lora`` / ``--lora_scale``
                   merged in order into the base; ``[]`` = the base model
``motion_frames``  must equal the run's ``--motion_frames`` (see below)        ``--motion_frames``
``lora_high``      ``--chain pro`` only, instead of ``loras``: the high-noise   ``--lora_high``
                   expert's LoRA, ``"PATH[:S]"`` or ``{path, strength}``;
                   ``null`` / ``""`` = none (``lora_low`` the same)             ``--lora_low``
=================  ==========================================================  ==================================

Not supported, rejected with the reason: ``keyframe`` (and ``last_frame`` / ``end_frame`` / ``end_image``): Wan2.1
I2V + SVI condition a clip on its first frame(s) only, there is no last-frame input; a ``motion_frames`` different
from the run's: the clip layout (each clip gives up its last ``m`` frames to the next) and the trained LoRAs fix
``m`` for the whole video. LoRA paths are relative to the schedule file's directory. ``--prompt_prefix`` applies to
every clip. Errors are one line naming the file, the line and the field.

Clip ``k`` runs with its own merged DiT params (one merge per distinct LoRA set; the current set and the
previous one stay merged, so consecutive clips with the same set never re-merge) and its own compiled sampler
(one per distinct ``steps, cfg_scale, solver``). ``--resume``: the file's sha256 is part of the saved settings.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import hashlib
import json
import math
import os
from typing import Any, Optional, Sequence

from svi_jax.prompts import clip_seed
from svi_jax.denoise import SOLVERS

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "solver", "loras", "motion_frames")
PAIR_FIELDS = ("lora_high", "lora_low")     # --chain pro: the two experts' LoRAs (Clip.loras = the pair, "" = none)
ALIASES = {"num_steps": "steps", "lora": "loras"}
KEYFRAME_FIELDS = ("keyframe", "keyframe_image", "last_frame", "end_frame", "end_image", "last_image")
JSONL_EXTS = (".jsonl", ".ndjson", ".json")
YAML_EXTS = (".yaml", ".yml")


class ScheduleError(ValueError):
    """A schedule file that cannot be used; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What an omitted field inherits (from the flags)."""

    prompt: Optional[str] = None
    negative_prompt: str = ""
    seed: int = 0
    seed_times: int = 42
    steps: int = 50
    cfg_scale: float = 5.0
    solver: str = "euler"
    loras: tuple = ()                       # ((absolute path, strength), ...)
    motion_frames: int = 1
    prompt_prefix: str = ""
    expert_pair: bool = False               # --chain pro: ``loras`` = ((high path or "", s), (low path or "", s))


@dataclasses.dataclass(frozen=True)
class Clip:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    solver: str
    loras: tuple                            # ((absolute path, strength), ...); --chain pro: the (high, low) pair
    line: int
    expert_pair: bool = False

    @property
    def sampler_key(self) -> tuple:
        return self.steps, self.cfg_scale, self.solver

    def record(self) -> dict:
        """What the clip's entry in ``OUT.json`` adds."""
        rec = {"schedule_line": self.line, "steps": self.steps, "cfg_scale": self.cfg_scale, "solver": self.solver,
               "negative_prompt": self.negative_prompt}
        if self.expert_pair:
            for name, (p, s) in zip(PAIR_FIELDS, self.loras):
                rec[name] = {"path": p, "strength": s} if p else None
        else:
            rec["loras"] = [{"path": p, "strength": s} for p, s in self.loras]
        return rec


# ------------------------------------------------------------------------------------------------ reading


@dataclasses.dataclass
class _Record:
    values: dict
    line: int
    field_lines: dict


def _err(source: str, line: int, field: Optional[str], msg: str) -> ScheduleError:
    where = f"schedule {source} line {line}" + (f", field '{field}'" if field else "")
    return ScheduleError(f"{where}: {msg}")


def _read_jsonl(text: str, source: str) -> list[_Record]:
    out = []
    for i, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#") or s.startswith("//"):
            continue
        try:
            value = json.loads(s)
        except ValueError as e:
            raise _err(source, i, None, f"not valid JSON ({getattr(e, 'msg', e)}, column "
                       f"{getattr(e, 'colno', '?')}); JSON Lines needs one {{...}} object per line") from None
        if not isinstance(value, dict):
            raise _err(source, i, None, f"expected an object {{\"prompt\": ...}}, got {type(value).__name__}")
        out.append(_Record(value, i, {k: i for k in value}))
    return out


def _read_yaml(text: str, source: str) -> list[_Record]:
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise _err(source, line, None, f"not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if root is None:
        return []
    if isinstance(root, yaml.MappingNode) and isinstance(data, dict) and set(data) == {"clips"}:
        root = next(v for k, v in root.value if k.value == "clips")
        data = data["clips"]
    if not isinstance(root, yaml.SequenceNode) or not isinstance(data, list):
        raise _err(source, root.start_mark.line + 1, None, "expected a list of clips ('- prompt: ...' items, or "
                   "'clips:' holding that list)")
    out = []
    for node, value in zip(root.value, data):
        line = node.start_mark.line + 1
        if not isinstance(value, dict) or not isinstance(node, yaml.MappingNode):
            raise _err(source, line, None, f"expected a mapping (prompt: ..., seed: ...), got "
                       f"{type(value).__name__}")
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
        out.append(_Record(value, line, lines))
    return out


def read_records(text: str, source: str) -> list[_Record]:
    """The raw records of a schedule's text: JSON Lines for ``.jsonl/.ndjson/.json`` (or text whose first
    non-comment line starts with ``{``), YAML otherwise."""
    if text.startswith("\ufeff"):
        text = text[1:]
    ext = os.path.splitext(source)[1].lower()
    first = next((s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")), "")
    jsonl = ext in JSONL_EXTS or (ext not in YAML_EXTS and first.startswith("{"))
    records = _read_jsonl(text, source) if jsonl else _read_yaml(text, source)
    if not records:
        raise ScheduleError(f"schedule {source}: no clips (one record per clip)")
    return records


# ------------------------------------------------------------------------------------------------ validation


def _int(v, source, line, field, lo):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(source, line, field, f"expected an integer, got {v!r}")
    if v < lo:
        raise _err(source, line, field, f"must be >= {lo}, got {v}")
    return int(v)


def _number(v, source, line, field):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(source, line, field, f"expected a number, got {v!r}")
    return float(v)


def _loras(v, source, line, base_dir, resolve, single: Optional[str] = None) -> tuple:
    """The ``loras`` list as ((absolute path, strength), ...); ``single``: the name of a one-LoRA field
    (``lora_high`` / ``lora_low``) whose value ``v`` is given here as a list of one, for its error messages."""
    from svi_jax.lora_formats import parse_spec

    if not isinstance(v, list):
        raise _err(source, line, "loras", f"expected a list of {{path, strength}}, got {type(v).__name__}")
    out = []
    for i, item in enumerate(v):
        field = single or f"loras[{i}]"
        if isinstance(item, str):
            try:
                spec = parse_spec(item)
            except ValueError as e:
                raise _err(source, line, field, str(e)) from None
            path, strength = spec.path, spec.strength
        elif isinstance(item, dict):
            extra = sorted(set(item) - {"path", "strength"})
            if extra:
                raise _err(source, line, f"{field}.{extra[0]}", "unknown key (a LoRA has 'path' and 'strength')")
            if not isinstance(item.get("path"), str) or not item["path"].strip():
                raise _err(source, line, f"{field}.path", "missing or not a string")
            path = item["path"]
            strength = _number(item.get("strength", 1.0), source, line, f"{field}.strength")
        else:
            raise _err(source, line, field, f"expected {{path, strength}} or 'PATH[:STRENGTH]', got {item!r}")
        full = path if os.path.isabs(path) else os.path.join(base_dir, path)
        try:
            full = os.path.abspath(resolve(full))
        except (FileNotFoundError, ValueError) as e:
            raise _err(source, line, f"{field}.path", f"{e} (relative paths are relative to the schedule file)") \
                from None
        out.append((full, float(strength)))
    return tuple(out)


def resolve_clips(records: Sequence[_Record], defaults: Defaults, source: str, base_dir: str = ".",
                  resolve=None, loras_refused: Optional[str] = None) -> list[Clip]:
    """Validated clips, omitted fields inherited from ``defaults`` (clip ``k``'s default seed is
    ``defaults.seed + k * defaults.seed_times``); ``loras_refused``: why a ``loras`` field is refused here."""
    resolve = resolve or _exists
    clips = []
    for k, rec in enumerate(records):
        v, line = {}, rec.line
        for key, value in rec.values.items():
            name = ALIASES.get(key, key) if isinstance(key, str) else key
            fl = rec.field_lines.get(key, line)
            if name in KEYFRAME_FIELDS:
                raise _err(source, fl, key, "keyframes are not supported: Wan2.1 I2V + SVI condition a clip on its "
                           "first frame(s) only (the previous clip's last frames, or the reference image); the "
                           "model has no input for a clip's last frame")
            if name in PAIR_FIELDS and not defaults.expert_pair:
                raise _err(source, fl, key, "applies with --chain pro only (the LoRA of one Wan2.2 expert); use "
                           "'loras'")
            known = FIELDS + (PAIR_FIELDS if defaults.expert_pair else ())
            if name not in known:
                near = difflib.get_close_matches(str(key), known + tuple(ALIASES), 1)
                raise _err(source, fl, str(key), "unknown field" + (f" (did you mean '{near[0]}'?)" if near else "")
                           + f"; fields: {', '.join(known)}")
            if name in v:
                raise _err(source, fl, key, f"given twice (as '{name}' and an alias)")
            v[name] = (value, fl)

        def get(name, check, default):
            if name not in v:
                return default
            value, fl = v[name]
            return check(value, fl)

        def text(name, allow_empty):
            def check(value, fl):
                if not isinstance(value, str):
                    raise _err(source, fl, name, f"expected text, got {value!r}")
                if not allow_empty and not value.strip():
                    raise _err(source, fl, name, "is empty")
                return value.strip() if not allow_empty else value
            return check

        prompt = get("prompt", text("prompt", False), defaults.prompt)
        if prompt is None:
            raise _err(source, line, "prompt", "missing (every clip needs a prompt when --prompt is not given)")
        if defaults.prompt_prefix:
            prompt = f"{defaults.prompt_prefix}, {prompt}"

        def solver(value, fl):
            if value not in SOLVERS:
                raise _err(source, fl, "solver", f"{value!r} is not a solver; choose one of {', '.join(SOLVERS)}")
            return value

        def motion(value, fl):
            m = _int(value, source, fl, "motion_frames", 1)
            if m != defaults.motion_frames:
                raise _err(source, fl, "motion_frames", f"{m} differs from the run's {defaults.motion_frames}: "
                           "motion frames cannot vary per clip (every clip gives up its last m frames to the next, "
                           "and the LoRA was trained with one m); set --motion_frames for the whole video")
            return m

        def loras(value, fl):
            if loras_refused or defaults.expert_pair:
                raise _err(source, fl, "loras", loras_refused or "with the expert pair give 'lora_high' / "
                           "'lora_low', not 'loras'")
            return _loras(value, source, fl, base_dir, resolve)

        def one_lora(name):
            def check(value, fl):
                if value is None or value == "":
                    return ("", 1.0)
                return _loras([value], source, fl, base_dir, resolve, single=name)[0]
            return check

        get("motion_frames", motion, None)
        clip_loras = get("loras", loras, tuple(defaults.loras))      # the expert pair refuses 'loras' here
        if defaults.expert_pair:
            clip_loras = tuple(get(n, one_lora(n), d) for n, d in zip(PAIR_FIELDS, defaults.loras))
        clips.append(Clip(
            prompt=prompt,
            negative_prompt=get("negative_prompt", text("negative_prompt", True), defaults.negative_prompt),
            seed=get("seed", lambda x, fl: _int(x, source, fl, "seed", 0),
                     clip_seed(defaults.seed, k, defaults.seed_times)),
            steps=get("steps", lambda x, fl: _int(x, source, fl, "steps", 1), int(defaults.steps)),
            cfg_scale=get("cfg_scale", lambda x, fl: _nonneg(_number(x, source, fl, "cfg_scale"), source, fl),
                          float(defaults.cfg_scale)),
            solver=get("solver", solver, defaults.solver),
            loras=clip_loras,
            line=line, expert_pair=defaults.expert_pair))
    return clips


def _nonneg(x, source, line):
    if x < 0:
        raise _err(source, line, "cfg_scale", f"must be >= 0, got {x}")
    return x


def _exists(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return path


# ------------------------------------------------------------------------------------------------ schedules


@dataclasses.dataclass
class Schedule:
    """The validated clips of a schedule file and the file's sha256 (part of the saved settings)."""

    path: str
    sha256: str
    clips: list
    defaults: Defaults
    lora_files: tuple = ()                  # every LoRA file the schedule names (all clips, before --num_clips)

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.clips]

    @property
    def needs_base(self) -> bool:
        """Whether some clip merges a LoRA set other than the flags' (the sampler must keep the base params)."""
        return any(c.loras != tuple(self.defaults.loras) for c in self.clips)

    def inputs(self, file_sha256=None) -> dict:
        """The ``schedule`` entry of the saved settings: the file's hash and the hashes of the LoRA files it uses."""
        files = sorted(set(self.lora_files) - {p for p, _ in self.defaults.loras if p})
        rec = {"sha256": self.sha256}
        if file_sha256 is not None and files:
            rec["loras"] = [{"path": p, "sha256": file_sha256(os.path.join(p, "config.json") if os.path.isdir(p)
                                                              else p)} for p in files]
        return {"schedule": rec}

    def runner(self, sampler, max_cached: int = 1) -> "ClipRunner":
        return ClipRunner(sampler, self, max_cached)


def parse(text: str, defaults: Defaults, source: str = "<schedule>", base_dir: str = ".", resolve=None,
          loras_refused: Optional[str] = None) -> Schedule:
    """A :class:`Schedule` from a schedule's text (see the module doc)."""
    clips = resolve_clips(read_records(text, source), defaults, source, base_dir, resolve, loras_refused)
    return Schedule(source, hashlib.sha256(text.encode("utf-8")).hexdigest(), clips, defaults,
                    tuple(sorted({p for c in clips for p, _ in c.loras if p})))


def load(path: str, defaults: Defaults, resolve=None, loras_refused: Optional[str] = None) -> Schedule:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ScheduleError(f"schedule file {path} does not exist") from None
    except IsADirectoryError:
        raise ScheduleError(f"schedule {path} is a directory, not a file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScheduleError(f"schedule {path} is not UTF-8 text: {e}") from None
    s = parse(text, defaults, path, os.path.dirname(os.path.abspath(path)), resolve, loras_refused)
    s.sha256 = hashlib.sha256(data).hexdigest()
    return s


class ClipRunner:
    """Switches a :class:`svi_jax.long_video.LongVideoSampler` to clip ``k``'s settings (``generate(clip_setup=...)``):
    its compiled sampler (cached per ``steps, cfg_scale, solver``), negative prompt and merged LoRA params (the
    current set plus ``max_cached`` earlier ones stay merged). :meth:`restore` puts the flags' settings back."""

    def __init__(self, sampler, schedule: Schedule, max_cached: int = 1):
        self.sampler, self.schedule, self.max_cached = sampler, schedule, int(max_cached)
        d = schedule.defaults
        self.initial = (sampler.sample_fn, sampler.compile_s, sampler.num_steps, sampler.cfg_scale, sampler.solver,
                        sampler.negative_prompt, sampler.params)
        self.key = (int(sampler.num_steps), float(sampler.cfg_scale), sampler.solver)
        self.fns: dict = {}
        self.lora_key = tuple(d.loras)
        self.merged: collections.OrderedDict = collections.OrderedDict()
        self.merges = 0                      # LoRA merges done (tests: unchanged sets do not re-merge)

    def __call__(self, k: int) -> tuple[int, dict]:
        """Set up clip ``k``; returns its seed and the entries its record adds."""
        s, c = self.sampler, self.schedule.clips[k]
        if c.sampler_key != self.key:
            self.fns[self.key] = (s.sample_fn, s.compile_s)
            fn, compiled = self.fns.pop(c.sampler_key, None) or (s.make_sample_fn(*c.sampler_key), None)
            s.sample_fn, s.compile_s = fn, compiled
            s.num_steps, s.cfg_scale, s.solver = c.sampler_key
            self.key = c.sampler_key
        s.negative_prompt = c.negative_prompt
        if c.loras != self.lora_key:
            self.merged[self.lora_key] = s.params
            self.merged.move_to_end(self.lora_key)
            params = self.merged.pop(c.loras, None)
            if params is None:
                if s.base_params is None:
                    raise ValueError("per-clip LoRAs need the sampler's base params (LongVideoSampler(keep_base="
                                     "True))")
                params = s.place(s.merge_loras(s.base_params, [_spec(p, x) for p, x in c.loras]) if c.loras
                                 else s.base_params)
                self.merges += 1
            s.params, self.lora_key = params, c.loras
            while len(self.merged) > self.max_cached:
                self.merged.popitem(last=False)
        return c.seed, c.record()

    def restore(self) -> None:
        s = self.sampler
        (s.sample_fn, s.compile_s, s.num_steps, s.cfg_scale, s.solver, s.negative_prompt, s.params) = self.initial


def _spec(path, strength):
    from svi_jax.lora_formats import LoraSpec

    return LoraSpec(path, strength)


# ------------------------------------------------------------------------------------------------ CLI


def from_flags(FLAGS, config, cfg_scale: float) -> Schedule:
    """The ``--schedule`` of ``python -m svi_jax.sample``, checked against the flags it cannot be combined with."""
    from svi_jax.lora_formats import parse_specs
    from svi_jax.sample_output import resolve_lora

    if FLAGS.prompts:
        raise ScheduleError("give either --schedule FILE (prompts per clip) or --prompts FILE, not both (--prompt "
                            "TEXT gives the prompt of clips that set none)")
    for name, default in (("repeat_prompt", 1), ("keep_first_prompt", False), ("cycle_prompts", False)):
        if getattr(FLAGS, name) != default:
            raise ScheduleError(f"--{name} does not apply with --schedule (one record per clip)")
    if config.model.get("multitalk", False):
        raise ScheduleError("--schedule does not apply to SVI-Talk (its clips follow the audio)")
    pro = FLAGS.chain == "pro"
    if FLAGS.prompt is not None and not FLAGS.prompt.strip():
        raise ScheduleError("--prompt is empty: give a prompt, or leave it out and set one in every clip")
    if pro:                     # the flags' pair: ((high path or "", strength), (low path or "", strength))
        from svi_jax.pro import parse_lora

        flag_loras = tuple((os.path.abspath(resolve_lora(p)) if p else "", float(x))
                           for p, x in (parse_lora(FLAGS.lora_high), parse_lora(FLAGS.lora_low)))
    else:
        flag_loras = tuple((os.path.abspath(resolve_lora(x.path)), float(x.strength))
                           for x in parse_specs(FLAGS.lora, float(FLAGS.lora_scale)))
    negative = FLAGS.negative_prompt
    if pro and not FLAGS["negative_prompt"].present:     # --chain pro: the Pro script's own negative prompt
        from svi_jax.pro import PRO_NEGATIVE_PROMPT

        negative = PRO_NEGATIVE_PROMPT
    defaults = Defaults(prompt=FLAGS.prompt.strip() if FLAGS.prompt else None, negative_prompt=negative,
                        seed=int(FLAGS.seed), seed_times=int(FLAGS.seed_times), steps=int(FLAGS.num_steps),
                        cfg_scale=float(cfg_scale), solver=FLAGS.solver, loras=flag_loras,
                        motion_frames=int(FLAGS.motion_frames if FLAGS.motion_frames is not None
                                          else config.data.get("num_motion_frames", 1)),
                        prompt_prefix=FLAGS.prompt_prefix, expert_pair=pro)
    dance = config.model.get("pose_embedding", False)
    refused = None
    if dance:
        refused = "per-clip LoRAs are not supported for SVI-Dance (its pose adapter comes with the --lora it merges)"
    elif pro:
        refused = ("--chain pro takes each clip's LoRA pair as 'lora_high' / 'lora_low' (PATH[:STRENGTH]), not "
                   "'loras'")
    s = load(FLAGS.schedule, defaults, resolve=resolve_lora, loras_refused=refused)
    if FLAGS.num_clips:
        if FLAGS.num_clips > len(s.clips):
            raise ScheduleError(f"--num_clips {FLAGS.num_clips} but the schedule {FLAGS.schedule} has "
                                f"{len(s.clips)} clips")
        s.clips = s.clips[:FLAGS.num_clips]
    return s


def check_resume(out: str, schedule: Optional[Schedule]) -> None:
    """``--resume``: the generation in ``OUT.mp4.parts`` was started with this very schedule (or none); raises
    :class:`ScheduleError` (a ``ValueError``: ``python -m svi_jax.sample`` runs as ``__main__``, so its own
    ``ResumeError`` class is not the one importable here)."""
    from svi_jax.sample_output import Output

    path = Output(out).state_json
    try:
        with open(path) as f:
            saved: Any = json.load(f).get("settings", {}).get("schedule")
    except (OSError, ValueError):
        return                                  # nothing (readable) to resume: generate() says what it does
    now = schedule.sha256 if schedule is not None else None
    was = saved.get("sha256") if isinstance(saved, dict) else None
    if was == now:
        return
    if was is None:
        raise ScheduleError("cannot resume with --schedule: this generation was started without one (pass "
                          "--overwrite to start over with the schedule)")
    if now is None:
        raise ScheduleError("cannot resume without --schedule: this generation was started with a schedule (give "
                          "the same --schedule FILE)")
    raise ScheduleError(f"cannot resume: the schedule changed since this generation started (sha256 {was[:12]}... "
                      f"-> {now[:12]}...); restore the file, or pass --overwrite to start over")
