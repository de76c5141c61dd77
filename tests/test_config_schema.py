"""Strict configs (svi_jax/config_schema.py): every shipped config passes; a typo of any key, in a config file or a
``--config.a.b=value`` override, is one line naming the key and the closest known one; moved keys say where they
went; one loader with ``--config.a.b=value`` for the argparse commands; configs/tiny.py stands on its own with the
values it had (tests/config_snapshot.json, taken before the layout change)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from svi_jax import cli, config_schema, run_config
from svi_jax.config_schema import UnknownConfigKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
TRAIN_CONFIGS = ["tiny", "drift", "shot", "film", "t2v_1_3b", "talk", "talk_tiny", "dance", "dance_tiny", "pro",
                 "pro_high", "pro_low", "pro_tiny"]
MODELS = ["wan_i2v_14b", "wan_t2v_14b", "wan_t2v_1_3b", "wan22_i2v_a14b", "wan22_t2v_a14b"]
TYPO_CONFIGS = ["tiny", "talk_tiny", "dance_tiny", "pro_tiny", "drift"]


def _config(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


def _sections(node, path=""):
    """``(path, section)`` of every section of a config the schema checks."""
    yield path, node
    for k, v in node.items():
        if config_schema._is_section(v):
            yield from _sections(v, f"{path}.{k}" if path else k)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_shipped_config_passes(name):
    config_schema.check(_config(name))


def test_model_presets_moved_with_aliases():
    for name in MODELS:
        new = importlib.import_module(f"configs.models.{name}")
        old = importlib.import_module(f"configs.{name}")
        assert old.get_config is new.get_config and "Deprecated alias" in old.__doc__
        config_schema.check({"model": new.get_config()})


def test_schema_tables_match_the_defaults():
    from configs import base, tiny
    from svi_jax.data.config import default_config
    from svi_jax.erft.inject import DEFAULTS

    assert set(default_config()) <= set(config_schema.DATA)
    assert set(config_schema.ERFT) == set(DEFAULTS) | {"enabled", "bank_dtype", "bank_mode", "bank_replicas"}
    c = base.train_config(tiny.model_config(), "x")
    for path, node in _sections(c):
        known = config_schema.known_keys(path, node)
        assert known is not None and set(node) <= set(known), path


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_tiny_stands_alone_with_the_values_it_had():
    from configs import drift, tiny
    from svi_jax import sharding

    src = open(os.path.join(ROOT, "configs", "tiny.py")).read()
    assert "drift" not in "".join(ln for ln in src.splitlines() if ln.startswith(("import", "from")))
    snap = json.load(open(os.path.join(ROOT, "tests", "config_snapshot.json")))
    pkg = os.path.dirname(os.path.abspath(sharding.__file__))
    rules = json.loads(json.dumps(sharding.LOGICAL_RULES))
    for name, config in (("tiny", tiny.get_config()), ("drift", drift.get_config()),
                         ("drift_quick", drift.get_quick_config())):
        now = _flat(json.loads(config.to_json_best_effort().replace(pkg, "<svi_jax>")))
        assert now.pop("sharding.rules") == rules                       # added: the rules table
        before = {config_schema.MOVED.get(k, k): v for k, v in _flat(snap[name]).items()}   # moved keys
        assert now == before, name


def _typo(key: str) -> str:
    return key + key[-1]


@pytest.mark.parametrize("name", TYPO_CONFIGS)
def test_a_typo_of_any_key_in_a_file_names_the_closest(name):
    config = _config(name)
    n = 0
    for path, node in list(_sections(config)):
        for key in list(node):
            typo = _typo(key)
            node[typo] = node[key]
            with pytest.raises(UnknownConfigKey) as e:
                config_schema.check(config)
            del node[typo]
            where = f"config.{path + '.' if path else ''}"
            assert str(e.value) == f"{where}{typo}: unknown key; did you mean {where}{key}?"
            n += 1
    assert n > 100


@pytest.mark.parametrize("name", ["tiny", "talk_tiny"])
def test_a_typo_of_any_override_names_the_closest(name):
    config = _config(name)
    for dotted, value in cli.config_fields(config, prefix=""):
        dotted = dotted.lstrip(".")
        *parents, key = dotted.split(".")
        where = "config." + "".join(p + "." for p in parents)
        with pytest.raises(UnknownConfigKey) as e:
            cli.apply_override(config, f"{dotted}{key[-1]}=1")
        assert str(e.value) == f"{where}{key}{key[-1]}: unknown key; did you mean {where}{key}?"
    config_schema.check(config)                                       # nothing was added


def test_moved_and_misplaced_keys():
    from configs import tiny

    c = tiny.get_config()
    with pytest.raises(UnknownConfigKey, match=r"^config.erft.handcrafted_p: moved to config.baseline.handcrafted_p"):
        cli.apply_override(c, "erft.handcrafted_p=0.5")
    c.erft.handcrafted_strength = 2.0
    with pytest.raises(UnknownConfigKey, match=r"^config.erft.handcrafted_strength: moved to config.baseline"):
        config_schema.check(c)
    del c.erft["handcrafted_strength"]
    with pytest.raises(UnknownConfigKey, match=r"^config.train.lr: unknown key; did you mean config.optim.lr\?$"):
        cli.apply_override(c, "train.lr=1")
    with pytest.raises(UnknownConfigKey, match=r"^config.talk: not a field of this config"):
        cli.apply_override(c, "talk.fps=1")
    with pytest.raises(UnknownConfigKey, match=r"^config.erft.capacity: is a value"):
        cli.apply_override(c, "erft.capacity.x=1")
    with pytest.raises(config_schema.ConfigError, match="is a section"):
        cli.apply_override(c, "erft=1")
    c.encoders.vae.kind = "vq"
    with pytest.raises(UnknownConfigKey, match="'vq' is not a codec"):
        config_schema.check(c)
    c.encoders.vae.kind = "wan"          # the Wan VAE's fields, not the patch codec's
    with pytest.raises(UnknownConfigKey, match=r"^config.encoders.vae.basis: unknown key"):
        config_schema.check(c)


def test_sharding_rules_in_the_config():
    from configs import tiny
    from svi_jax import sharding

    c = tiny.get_config()
    assert tuple(c.sharding.rules) == sharding.LOGICAL_RULES
    cli.apply_override(c, "sharding.rules=(('embed', ('fsdp', 'context')), ('heads', None))")
    assert c.sharding.rules == (("embed", ("fsdp", "context")), ("heads", None))
    config_schema.check(c)
    assert config_schema.logical_rules(json.loads(c.to_json())) == c.sharding.rules    # lists -> tuples
    assert config_schema.logical_rules({"model": {}}) is None
    c.sharding.rules = (("embed", "fsdp_"),)
    with pytest.raises(config_schema.ConfigError, match="the mesh axes are data, fsdp, context, tensor"):
        config_schema.check(c)


def test_data_config_refuses_unknown_fields():
    from svi_jax.data.config import default_config

    assert default_config(num_frames=5).num_frames == 5
    with pytest.raises(UnknownConfigKey, match=r"^config.data.num_frame: unknown key; did you mean "
                                               r"config.data.num_frames\?$"):
        default_config(num_frame=5)


def test_load_config_overrides_and_types(tmp_path):
    c = cli.load_config("configs/pro_tiny.py:low", ["train.num_steps=7", "optim.lr=3e-4", "data.shuffle=false",
                                                    "name=x", "model.patch_size=(1, 4, 4)", "config.lora.rank=2"])
    assert (c.pro.expert, c.train.num_steps, c.optim.lr, c.data.shuffle, c.name) == ("low", 7, 3e-4, False, "x")
    assert c.model.patch_size == (1, 4, 4) and c.lora.rank == 2
    with pytest.raises(config_schema.ConfigError, match=r"^config.train.num_steps=ten: "):
        cli.load_config("configs/tiny.py", ["train.num_steps=ten"])
    with pytest.raises(config_schema.ConfigError, match="expected true or false"):
        cli.load_config("configs/tiny.py", ["data.shuffle=maybe"])
    with pytest.raises(FileNotFoundError):
        cli.load_config(str(tmp_path / "none.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("from configs import tiny\n\ndef get_config():\n    c = tiny.get_config()\n"
                   "    c.lora.rnak = 2\n    return c\n")
    with pytest.raises(UnknownConfigKey, match=r"^config.lora.rnak: unknown key; did you mean config.lora.rank\?$"):
        cli.load_config(str(bad))


def test_one_override_syntax(capsys):
    rest, items = cli.split_config_overrides(["--config", "c.py", "--config.a.b=1", "--config.c", "2", "--set",
                                              "d=3", "--set=e=4", "--x", "--", "--config.f=5"], ("--set",))
    assert rest == ["--config", "c.py", "--x", "--", "--config.f=5"] and items == ["a.b=1", "c=2", "d=3", "e=4"]
    assert capsys.readouterr().err.count("deprecated") == 1
    from svi_jax import plan

    args = plan.build_parser().parse_args(["--config", "configs/tiny.py", "--devices", "2", "--config.lora.rank=4",
                                           "--set", "erft.capacity=6", "--config.model.num-layers=1"])
    assert args.set == ["lora.rank=4", "erft.capacity=6", "model.num_layers=1"]
    assert "deprecated; use --config.KEY=VALUE" in capsys.readouterr().err
    assert "--set" not in plan.build_parser().format_help()             # hidden, still read
    c = plan.load_config(args.config, args.set)
    assert (c.lora.rank, c.erft.capacity, c.model.num_layers) == (4, 6, 1)


def test_resume_compares_moved_keys_at_their_new_place():
    old = {"erft": {"handcrafted_p": 0.0, "capacity": 8}, "train": {"seed": 0}}
    assert run_config.changes(old, {"erft": {"capacity": 8}, "baseline": {"handcrafted_p": 0.0},
                                    "train": {"seed": 0}}) == []
    assert run_config.changes(old, {"erft": {"capacity": 8}, "baseline": {"handcrafted_p": 0.5},
                                    "train": {"seed": 0}}) == [("baseline.handcrafted_p", 0.0, 0.5)]


def test_cli_typos_are_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from configs import tiny\n\ndef get_config():\n    c = tiny.get_config()\n"
                   "    c.encoders.t5.num_layerz = 1\n    return c\n")
    for cmd, want in (
            (["-m", "svi_jax.train", "--config", "configs/tiny.py", "--config.erft.capacityy=3"],
             "config.erft.capacityy: unknown key; did you mean config.erft.capacity?"),
            (["-m", "svi_jax.sample", "--config", str(bad), "--prompt", "x", "--image", "x.png", "--out", "o.mp4"],
             "config.encoders.t5.num_layerz: unknown key; did you mean config.encoders.t5.num_layers?")):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {want}"], r.stderr[-2000:]
