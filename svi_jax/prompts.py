"""Prompt files and the prompt of every clip (``--prompts``, ``--repeat_prompt``, ``--keep_first_prompt``,
``--cycle_prompts``, ``--prompt_prefix``) and the seed of every clip, as the official ``test_svi.py``."""
from __future__ import annotations

import ast
import logging
import re
from typing import Sequence

log = logging.getLogger("svi_jax.sample")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as a prompt list."""


def parse_prompts(text: str, source: str = "<prompts>") -> list[str]:
    """Prompts from a file's text: a Python-style list (``prompts = [...]`` or a bare ``[...]``, parsed as a
    literal, never executed), or one prompt per line with blank lines and ``#`` comment lines skipped."""
    if text.startswith("\ufeff"):
        text = text[1:]
    m = re.search(r"^\s*(?:prompts\s*=\s*)?\[", text, flags=re.M)
    stripped = "\n".join(l for l in text.splitlines() if l.strip() and not l.strip().startswith("#"))
    if m and (re.search(r"^\s*prompts\s*=\s*\[", text, flags=re.M) or stripped.lstrip().startswith("[")):
        expr = text[m.start():]
        expr = expr[expr.index("["):]
        try:
            value = ast.literal_eval(expr.strip())
        except (SyntaxError, ValueError) as e:
            where = f" (line {text[:m.start()].count(chr(10)) + getattr(e, 'lineno', 1) or 1})" \
                if isinstance(e, SyntaxError) else ""
            raise PromptFileError(f"{source}: the prompt list is not a valid Python list of strings{where}: "
                                  f"{e.__class__.__name__}: {getattr(e, 'msg', e)}") from None
        if not isinstance(value, (list, tuple)):
            raise PromptFileError(f"{source}: expected a list of strings, got {type(value).__name__}")
        bad = [i for i, p in enumerate(value) if not isinstance(p, str)]
        if bad:
            raise PromptFileError(f"{source}: prompt list item {bad[0]} is a {type(value[bad[0]]).__name__}, "
                                  f"not a string")
        prompts = [p.strip() for p in value]
        if any(not p for p in prompts):
            raise PromptFileError(f"{source}: prompt list item {prompts.index('')} is empty")
    else:
        prompts = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    if not prompts:
        raise PromptFileError(f"{source}: no prompts (blank lines and '#' comments are skipped)")
    return prompts


def load_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text: {e}") from None
    return parse_prompts(text, path)


def schedule_prompts(prompts: Sequence[str], num_clips: int = 0, repeat: int = 1, keep_first: bool = False,
                     cycle: bool = False, prefix: str = "") -> list[str]:
    """The prompt of every clip, as ``test_svi.py``: prompt ``k // repeat`` (each prompt ``repeat`` times), or the
    first prompt for all ``num_clips`` clips. ``num_clips = 0``: one clip per scheduled prompt. Without ``cycle``
    the schedule stops at the end of the list (official); with it, it wraps around."""
    if not prompts:
        raise PromptFileError("no prompts")
    if repeat < 1:
        raise ValueError(f"repeat_prompt must be >= 1, got {repeat}")
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    if keep_first:
        if num_clips == 0:
            raise ValueError("--keep_first_prompt needs --num_clips (how many clips to generate)")
        out = [prompts[0]] * num_clips
    else:
        available = len(prompts) * repeat
        n = num_clips or available
        if not cycle and n > available:
            log.warning("%d clips asked for but the prompt schedule has %d (%d prompts x %d): generating %d "
                        "(--cycle_prompts wraps around, --keep_first_prompt reuses the first)",
                        n, available, len(prompts), repeat, available)
            n = available
        out = [prompts[(k // repeat) % len(prompts)] for k in range(n)]
    if prefix:
        out = [f"{prefix}, {p}" for p in out]
    return out


def clip_seed(seed: int, k: int, seed_times: int = 42) -> int:
    """Seed of clip ``k``: ``seed + k * seed_times`` (the official script uses ``k * seed_times``)."""
    return int(seed) + int(k) * int(seed_times)
