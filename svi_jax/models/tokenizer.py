"""Wan's text tokenization for UMT5: the user's local ``google/umt5-xxl`` files, nothing downloaded.

Wan (``wan/modules/tokenizers.py``) cleans each prompt (``ftfy.fix_text``, double HTML unescape, whitespace
collapse), tokenizes with ``add_special_tokens=True`` (appends ``</s>``), truncates to ``text_len`` keeping the
``</s>``, and pads with the pad id (0) to exactly ``text_len``. :class:`Tokenizer` does the same with either

* ``transformers``: ``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` -- what Wan itself calls; used
  when the directory has ``tokenizer.json`` or ``tokenizer_config.json`` (the Wan release's ``google/umt5-xxl``);
* ``sentencepiece``: the ``spiece.model`` read directly (pieces + ``</s>``), for a directory holding only that.
"""
from __future__ import annotations

import glob
import html
import os
import re
import shutil
import warnings
from typing import Sequence

import numpy as np

# Files that make up a tokenizer directory (never model weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
BACKENDS = ("auto", "transformers", "sentencepiece")


class TokenizerError(ValueError):
    """A tokenizer directory is missing or unusable."""


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:  # pragma: no cover - ftfy is a dependency; stay usable without it
        warnings.warn("ftfy is not installed: prompts are not mojibake-fixed as Wan does (pip install ftfy)",
                      stacklevel=3)
        return text
    return ftfy.fix_text(text)


def clean_text(text: str, mode: str | None = "whitespace") -> str:
    """Wan's prompt cleaning. ``mode``: ``None`` (as is), ``'whitespace'`` (Wan's T5 default) or ``'lower'``."""
    if mode is None:
        return text
    if mode not in ("whitespace", "lower"):
        raise ValueError(f"clean mode must be None, 'whitespace' or 'lower', got {mode!r}")
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower() if mode == "lower" else text


def tokenizer_files(directory: str) -> list[str]:
    """The tokenizer files present in ``directory`` (raises if there are none)."""
    if not os.path.isdir(directory):
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    found = [os.path.join(directory, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]
    found += [f for f in sorted(glob.glob(os.path.join(directory, "*.model"))) if f not in found]
    if not found:
        raise TokenizerError(f"{directory} holds no tokenizer files (expected some of {list(TOKENIZER_FILES)}); "
                             f"point to the local google/umt5-xxl tokenizer directory of the Wan release")
    return found


def copy_tokenizer(src_dir: str, dst_dir: str) -> str:
    """Copy the tokenizer files of ``src_dir`` (only those, never weights) into ``dst_dir``."""
    files = tokenizer_files(src_dir)
    os.makedirs(dst_dir, exist_ok=True)
    for f in files:
        dst = os.path.join(dst_dir, os.path.basename(f))
        if os.path.abspath(f) != os.path.abspath(dst):
            shutil.copyfile(f, dst)
    return dst_dir


class Tokenizer:
    """``tok(texts) -> (ids, mask)``, both ``int32 [B, text_len]``; padded positions have id ``pad_id``, mask 0."""

    def __init__(self, directory: str, text_len: int = 512, clean: str | None = "whitespace",
                 backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        files = [os.path.basename(f) for f in tokenizer_files(directory)]
        self.directory = os.path.abspath(directory)
        self.text_len = int(text_len)
        self.clean = clean
        if backend == "auto":
            backend = "transformers" if {"tokenizer.json", "tokenizer_config.json"} & set(files) else "sentencepiece"
        self.backend = backend
        if backend == "transformers":
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
            except Exception as e:
                raise TokenizerError(f"transformers cannot load the tokenizer in {directory}: {e}") from e
            self.pad_id = int(self._hf.pad_token_id if self._hf.pad_token_id is not None else 0)
            self.eos_id = self._hf.eos_token_id
            self.vocab_size = len(self._hf)
        else:
            import sentencepiece as spm

            models = [f for f in files if f.endswith(".model")]
            if not models:
                raise TokenizerError(f"{directory}: no sentencepiece *.model file for the sentencepiece backend")
            path = os.path.join(self.directory, "spiece.model" if "spiece.model" in models else models[0])
            try:
                self._sp = spm.SentencePieceProcessor(model_file=path)
            except Exception as e:
                raise TokenizerError(f"sentencepiece cannot read {path}: {e}") from e
            self.pad_id = max(int(self._sp.pad_id()), 0)
            self.eos_id = int(self._sp.eos_id())
            if self.eos_id < 0:
                raise TokenizerError(f"{path} defines no end-of-sequence token")
            self.vocab_size = int(self._sp.get_piece_size())

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        texts = [clean_text(t, self.clean) for t in texts]
        n = self.text_len
        if self.backend == "transformers":
            out = self._hf(texts, padding="max_length", truncation=True, max_length=n, add_special_tokens=True,
                           return_attention_mask=True)
            ids = np.asarray(out["input_ids"], np.int32)
            mask = np.asarray(out["attention_mask"], np.int32)
        else:
            ids = np.full((len(texts), n), self.pad_id, np.int32)
            mask = np.zeros((len(texts), n), np.int32)
            for i, t in enumerate(texts):
                toks = list(self._sp.encode(t))[: n - 1] + [self.eos_id]
                ids[i, : len(toks)] = toks
                mask[i, : len(toks)] = 1
        if ids.shape != (len(texts), n):
            raise TokenizerError(f"tokenizer returned shape {ids.shape}, expected {(len(texts), n)}")
        return ids, mask
