"""One way every command line fails: a single ``error: ...`` line (exit code 2) for an expected failure, a short
``error: internal error ...`` line (exit code 1) for anything else, and the traceback only with ``--debug`` or
``SVI_DEBUG=1``.

Used by ``python -m svi_jax.train``, ``python -m svi_jax.sample``, ``convert/from_torch.py``, ``python -m
svi_jax.data``, ``python -m svi_jax.plan`` and ``python -m svi_jax.eval.drift``::

    sys.exit(cli.run(main, argv))                       # argparse tools
    cli.absl_run(main, _define_flags)                   # absl tools (train, sample)

Messages never advise weakening a safety check (``weights_only=False``, ``strict=False``): text from a library that
does is replaced by a neutral explanation.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "SVI_DEBUG"

# advice from libraries that must never reach a user
_UNSAFE = ("weights_only=False", "strict=False", "weights_only = False", "strict = False")


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "False"):
        return True
    return bool(argv) and "--debug" in argv


def strip_debug(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a not in ("--debug", "--nodebug")]


def expected_errors() -> tuple[type, ...]:
    """The exception types that mean bad input (a file, a key, a field), not a bug."""
    out: list[type] = [ValueError, OSError, KeyError, EOFError, FloatingPointError]
    try:
        from PIL import Image, UnidentifiedImageError

        out += [UnidentifiedImageError, Image.DecompressionBombError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from safetensors import SafetensorError

        out.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(out)


def message(e: BaseException) -> str:
    """One line for ``e``: its message with newlines folded and unsafe advice removed."""
    text = str(e).strip()
    if isinstance(e, (KeyError, AttributeError)) and len(e.args) == 1:
        arg = e.args[0]
        arg = arg.args[0] if isinstance(arg, BaseException) and arg.args else arg
        text = str(arg) if isinstance(e, AttributeError) else f"missing key {arg!r}"
    if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    if any(u in text for u in _UNSAFE):
        text = text.split("\n")[0]
        for u in _UNSAFE:
            if u in text:
                text = text[: text.index(u)].rstrip(" (,;:") + " (refused: the file holds more than plain tensors)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def quiet_asyncio() -> None:
    """Drop the 'Event loop is closed' noise orbax's background threads print after a failure."""

    class _Drop(logging.Filter):
        def filter(self, record):
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += str(record.exc_info[1])
            return "Event loop is closed" not in text

    for name in ("asyncio", "absl", ""):
        logging.getLogger(name).addFilter(_Drop())
    old = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
            return
        old(u)

    sys.unraisablehook = hook


def guard(fn: Callable[[], int | None], debug: bool = False, expected: tuple[type, ...] = ()) -> int:
    """Run ``fn``; expected failures -> one ``error:`` line and 2; others -> one line and 1 (re-raised with debug)."""
    quiet_asyncio()
    try:
        rc = fn()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except expected_errors() + tuple(expected) as e:
        if debug:
            raise
        print(f"error: {message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {message(e)[:300]}); rerun with --debug (or "
              f"{DEBUG_ENV}=1) for the traceback and report it", file=sys.stderr)
        return 1
    return int(rc or 0)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """An argparse tool's ``main(argv)`` under :func:`guard` (``--debug`` anywhere in ``argv`` is taken out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return guard(lambda: main(strip_debug(argv)), debug_enabled(argv))


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
DEFAULT_HELP_CONFIG = "configs/tiny.py"


def _config_for_help(argv: Sequence[str]):
    """``(path, ConfigDict)`` of ``--config`` in ``argv`` (``PATH[:ARG]``), else of :data:`DEFAULT_HELP_CONFIG`."""
    import importlib.util

    spec = DEFAULT_HELP_CONFIG
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    path, _, arg = spec.partition(":")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(path) and os.path.isfile(os.path.join(root, path)):
        path = os.path.join(root, path)
    for d in (root, os.getcwd()):
        if d not in sys.path:
            sys.path.insert(0, d)
    mod_spec = importlib.util.spec_from_file_location("_help_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return spec, (mod.get_config(arg) if arg else mod.get_config())


def config_fields(config, prefix: str = "config") -> list[tuple[str, object]]:
    """Every leaf field of a ConfigDict as ``(dotted name, value)``, in order."""
    out = []
    for k, v in config.items():
        name = f"{prefix}.{k}"
        if hasattr(v, "items") and hasattr(v, "to_dict"):
            out += config_fields(v, name)
        else:
            out.append((name, v))
    return out


def print_help(argv: Sequence[str], out=None) -> None:
    """The command's flags, then every ``--config.a.b`` field with its value in the config given (or the tiny one)."""
    from absl import flags

    out = out or sys.stdout
    text = flags.FLAGS.main_module_help() if "--helpfull" not in argv else str(flags.FLAGS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.splitext(os.path.relpath(os.path.abspath(sys.argv[0]), root))[0].replace(os.sep, ".")
    print(f"usage: python -m {rel.removesuffix('.__main__')} --config FILE [flags]\n", file=out)
    print(text.strip() + "\n", file=out)
    try:
        spec, config = _config_for_help(argv)
    except Exception as e:  # a help request never fails on the config: say why the fields are missing
        print(f"config fields: cannot load the config ({message(e)})", file=out)
        return
    print(f"config fields (override any with --config.a.b=value; values of {spec}):", file=out)
    for name, value in config_fields(config):
        shown = repr(value)
        print(f"  --{name}={shown if len(shown) <= 70 else shown[:67] + '...'}", file=out)


def absl_run(main: Callable[[list[str]], int], define_flags: Callable[[], None]) -> None:
    """``absl.app.run`` with one-line flag errors (a typo in ``--config.x=...``) and :func:`guard`; ``--help``
    prints the flags and the config fields and exits 0."""
    from absl import app, flags

    debug = debug_enabled(sys.argv[1:])
    define_flags()
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        print_help(sys.argv[1:])
        sys.exit(0)

    def parse(argv):
        try:
            return flags.FLAGS(strip_debug(argv))
        except flags.Error as e:
            if debug:
                raise
            print(f"error: {message(e)} (see --help)", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # ml_collections: an override of a field that does not exist, a config file error
            if debug:
                raise
            what = "no such config field " if isinstance(e, (AttributeError, KeyError)) else ""
            print(f"error: {what}{message(e)} (check the --config.a.b=value overrides)", file=sys.stderr)
            sys.exit(2)

    app.run(lambda argv: sys.exit(guard(lambda: main(argv), debug)), flags_parser=parse)


def snake_case_argv(argv: Sequence[str]) -> list[str]:
    """``--foo-bar[=v]`` -> ``--foo_bar[=v]`` (up to a ``--``): every command's flags are ``--snake_case``; the dashed
    spellings of earlier releases stay accepted, unlisted, so scripts that use them keep working."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--":
            break
        if a.startswith("--") and len(a) > 2 and "-" in a[2:].partition("=")[0]:
            name, eq, value = a[2:].partition("=")
            out[i] = "--" + name.replace("-", "_") + eq + value
    return out


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reads dashed long flags as their ``--snake_case`` names
    (:func:`snake_case_argv`); subcommand parsers made by ``add_subparsers`` are of this class too."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(snake_case_argv(args), namespace)
