"""Prompt checks before sampling: a prompt longer than the text encoder's ``text_len`` warns with its token count."""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger("svi_jax.sample")


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` (end-of-sequence included) before the cut to ``tokenizer.text_len``."""
    n0 = tokenizer.text_len
    try:
        tokenizer.text_len = max(4 * n0, 4 * len(text.encode("utf-8")) + 8)
        _, mask = tokenizer([text])
        return int(mask.sum())
    finally:
        tokenizer.text_len = n0


def warn_long_prompts(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Warn once per distinct prompt longer than ``text_len`` tokens; returns the indices (first use) warned."""
    seen, warned = set(), []
    for i, p in enumerate(prompts):
        if p in seen:
            continue
        seen.add(p)
        n = token_count(tokenizer, p)
        if n > tokenizer.text_len:
            log.warning("prompt %d is %d tokens, longer than the text encoder's text_len %d: the last %d tokens are "
                        "cut (%r...)", i, n, tokenizer.text_len, n - tokenizer.text_len, p[:60])
            warned.append(i)
    return warned
