"""One way every command line fails: a single ``error: ...`` line (exit code 2) for an expected failure, a short
``error: internal error ...`` line (exit code 1) for anything else, and the traceback only with ``--debug`` or
``SVI_DEBUG=1``.

Used by ``python -m svi_jax.train``, ``python -m svi_jax.sample``, ``convert/from_torch.py``, ``python -m
svi_jax.data``, ``python -m svi_jax.plan`` and ``python -m svi_jax.eval.drift``::

    sys.exit(cli.run(main, argv))                       # argparse tools
    cli.absl_run(main, _define_flags)                   # absl tools (train, sample, demo)

Configs: every command that takes ``--config FILE`` overrides its fields with ``--config.a.b=value`` and checks
every key once at start-up (:mod:`svi_jax.config_schema`: an unknown key is one line naming the closest known one);
the argparse commands load with :func:`load_config` (``ArgumentParser(config_overrides=True)``), the absl ones
with ml_collections' config flag, checked by :func:`absl_run`. ``--help`` lists the config fields and their values.

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
OVERRIDE_PREFIX = "--config."
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ configs


def _config_path(spec: str) -> tuple[str, str]:
    """``PATH[:ARG]`` -> ``(path, arg)``, a relative path that is not under the working directory taken from the
    repository root (``configs/tiny.py`` works from anywhere)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(_ROOT, path)):
        path = os.path.join(_ROOT, path)
    return path, arg


def coerce(old, text: str):
    """An override's text as the type of the field's current value ``old`` (bool, int, float, str, tuple/list,
    None: a Python literal or the text)."""
    import ast

    if isinstance(old, bool):
        low = text.strip().lower()
        if low not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return low in ("1", "true", "yes")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    if isinstance(old, (tuple, list)) or old is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if old is None:
                return text
            raise ValueError(f"expected a Python literal such as (1, 2), got {text!r}") from None
        return type(old)(value) if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)) else value
    return text


def apply_override(config, item: str) -> None:
    """``KEY=VALUE`` (``a.b.c=v``) set on ``config``; an unknown key is one line with the closest known key."""
    from svi_jax import config_schema
    from svi_jax.errors import ConfigError

    key, eq, value = item.partition("=")
    key = key.strip().removeprefix("config.")
    if not eq or not key:
        raise ConfigError(f"--config.{item}: expected --config.KEY=VALUE")
    config_schema.check_path(config, key)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    if config_schema._is_section(node[leaf]):
        raise ConfigError(f"config.{key}: is a section; set its fields (--config.{key}.FIELD=VALUE)")
    try:
        node[leaf] = coerce(node[leaf], value)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{key}={value}: {message(e)}") from None


def load_config(spec: str, overrides: Sequence[str] = (), check: bool = True):
    """The config of file ``PATH[:ARG]`` (its ``get_config([ARG])``; the repository root on ``sys.path``) with the
    ``KEY=VALUE`` overrides applied in order, then checked key by key (:func:`svi_jax.config_schema.check`).

    The one config loader of the argparse commands (``python -m svi_jax.plan``, ``python -m svi_jax.data cache``);
    the absl commands (train, sample, demo) load with ml_collections' ``--config`` flag and check the same way."""
    import importlib.util

    from svi_jax import config_schema
    from svi_jax.errors import ConfigError

    path, arg = _config_path(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such config file", path)
    for d in (os.path.dirname(os.path.dirname(os.path.abspath(path))), _ROOT):
        if d not in sys.path:
            sys.path.insert(0, d)
    mod_spec = importlib.util.spec_from_file_location("_svi_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path}: a config file defines get_config()")
    config = mod.get_config(arg) if arg else mod.get_config()
    if check:
        config_schema.check(config)      # the file's own keys first: an override cannot hide a typo in the file
    for item in overrides:
        apply_override(config, item)
    return config


def split_config_overrides(argv: Sequence[str], aliases: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(the other arguments, ["a.b=v", ...])`` of ``--config.a.b=v`` / ``--config.a.b v`` in ``argv`` (up to a
    ``--``); each of ``aliases`` (e.g. the deprecated ``--set a.b=v``) is read as one, with a one-line note."""
    rest, out, noted = [], [], False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        name = next((x for x in aliases if a == x or a.startswith(x + "=")), None)
        if a.startswith(OVERRIDE_PREFIX) or name:
            item = a[len(OVERRIDE_PREFIX):] if not name else a[len(name) + 1:]
            if (not name and "=" not in item) or (name and a == name):
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: {a} needs a value (see --help)")
                item = f"{item}={argv[i + 1]}" if not name else argv[i + 1]
                i += 1
            if name and not noted:
                print(f"note: {name} KEY=VALUE is deprecated; use --config.KEY=VALUE", file=sys.stderr)
                noted = True
            out.append(item)
        else:
            rest.append(a)
        i += 1
    return rest, out


def _config_for_help(argv: Sequence[str], default: str = ""):
    """``(path, ConfigDict)`` of ``--config`` in ``argv`` (``PATH[:ARG]``), else of ``default`` (else
    :data:`DEFAULT_HELP_CONFIG`)."""
    spec = default or DEFAULT_HELP_CONFIG
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec, load_config(spec, check=False)


def config_fields(config, prefix: str = "config") -> list[tuple[str, object]]:
    """Every leaf field of a ConfigDict as ``(dotted name, value)``, in order."""
    from svi_jax.config_schema import field_paths

    return field_paths(config, prefix)


def config_fields_help(argv: Sequence[str], default: str = "") -> str:
    """The ``--config.a.b=value`` lines of the config in ``argv`` (or ``default``, or the tiny one), for a command's
    ``--help``."""
    try:
        spec, config = _config_for_help(argv, default)
    except Exception as e:  # a help request never fails on the config: say why the fields are missing
        return f"config fields: cannot load the config ({message(e)})"
    lines = [f"config fields (override any with --config.a.b=value; values of {spec}):"]
    for name, value in config_fields(config):
        shown = repr(value)
        lines.append(f"  --{name}={shown if len(shown) <= 70 else shown[:67] + '...'}")
    return "\n".join(lines)


def print_help(argv: Sequence[str], out=None) -> None:
    """The command's flags, then every ``--config.a.b`` field with its value in the config given (or the tiny one)."""
    from absl import flags

    out = out or sys.stdout
    text = flags.FLAGS.main_module_help() if "--helpfull" not in argv else str(flags.FLAGS)
    rel = os.path.splitext(os.path.relpath(os.path.abspath(sys.argv[0]), _ROOT))[0].replace(os.sep, ".")
    print(f"usage: python -m {rel.removesuffix('.__main__')} --config FILE [flags]\n", file=out)
    print(text.strip() + "\n", file=out)
    print(config_fields_help(argv), file=out)


def _override_error(argv: Sequence[str]) -> str | None:
    """The one-line error of the first ``--config.a.b=v`` in ``argv`` whose key the config lacks (None if all
    exist: the failure was something else)."""
    from svi_jax import config_schema

    try:
        _, config = _config_for_help(argv)
    except Exception:  # noqa: BLE001 - the config file itself failed: the caller reports that
        return None
    for item in split_config_overrides(list(argv))[1]:
        try:
            config_schema.check_path(config, item.partition("=")[0])
        except config_schema.UnknownConfigKey as e:
            return str(e)
    return None


def check_flag_config(debug: bool) -> None:
    """After absl parsed the flags: refuse an unknown key in ``--config`` (one line, exit 2; a config file that
    failed to load is reported the same way)."""
    from absl import flags

    from svi_jax import config_schema

    if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
        return
    rc = guard(lambda: config_schema.check(flags.FLAGS.config), debug)
    if rc:
        sys.exit(rc)


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
            rest = flags.FLAGS(strip_debug(argv))
        except flags.Error as e:
            if debug:
                raise
            print(f"error: {message(e)} (see --help)", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # ml_collections: an override of a field that does not exist, a config file error
            if debug:
                raise
            line = _override_error(argv[1:])
            what = "no such config field " if isinstance(e, (AttributeError, KeyError)) else ""
            print(f"error: {line or what + message(e) + ' (check the --config.a.b=value overrides)'}",
                  file=sys.stderr)
            sys.exit(2)
        check_flag_config(debug)
        return rest

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
    (:func:`snake_case_argv`); subcommand parsers made by ``add_subparsers`` are of this class too.

    ``config_overrides=True`` (a command with ``--config FILE``): ``--config.a.b=value`` arguments are taken out
    before parsing into the list ``args.<overrides_dest>`` (``"a.b=value"`` strings for :func:`load_config`), each
    of ``override_aliases`` (a deprecated spelling, e.g. ``--set``) too, and ``--help`` ends with the config fields
    and their values (of the ``--config`` given, else configs/tiny.py)."""

    def __init__(self, *args, config_overrides: bool = False, overrides_dest: str = "config_overrides",
                 override_aliases: Sequence[str] = (), help_config: str = "", **kwargs):
        self.config_overrides, self.overrides_dest, self.help_config = config_overrides, overrides_dest, help_config
        self.override_aliases = tuple(override_aliases)
        self._help_argv: list[str] = []
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = snake_case_argv(sys.argv[1:] if args is None else args)
        if not self.config_overrides:
            return super().parse_known_args(args, namespace)
        self._help_argv = list(args)
        args, overrides = split_config_overrides(args, self.override_aliases)
        ns, rest = super().parse_known_args(args, namespace)
        setattr(ns, self.overrides_dest, overrides)
        return ns, rest

    def format_help(self):
        text = super().format_help()
        if not self.config_overrides:
            return text
        return text + "\n" + config_fields_help(self._help_argv, self.help_config) + "\n"
