"""Typed configs: YAML, CLI flags, unknown keys and bad values."""

import argparse
from dataclasses import dataclass, field

import pytest

from satori.config import add_config_arguments, config_from_args, from_dict, load_config
from satori.data import DataConfig
from satori.errors import SatoriError
from satori.evaluate import EvalConfig


@dataclass
class Inner:
    a: int = 1
    b: list[str] = field(default_factory=list)


@dataclass
class Outer:
    __aliases__ = {"inner": "inner.a"}
    x: float = 0.5
    name: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def parse(cls, argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, cls)
    return config_from_args(cls, p.parse_args(argv))


def test_defaults_yaml_and_flags_in_priority_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("x: 2\ninner:\n  a: 5\n  b: [p, q]\n")
    cfg = parse(Outer, ["--config", str(y), "--inner.a", "7", "--flag", "true"])
    assert cfg.x == 2.0 and cfg.inner.a == 7 and cfg.inner.b == ["p", "q"] and cfg.flag is True
    assert parse(Outer, []).inner.a == 1


def test_alias_sets_nested_field():
    assert parse(Outer, ["--inner", "9"]).inner.a == 9


def test_unknown_key_is_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("inner:\n  zz: 1\n")
    with pytest.raises(SatoriError, match=r"c\.yaml.*unknown config key 'zz' in section 'inner'"):
        parse(Outer, ["--config", str(y)])


def test_bad_values_are_named():
    with pytest.raises(SatoriError, match="'a' must be an integer"):
        from_dict(Outer, {"inner": {"a": "three"}})
    with pytest.raises(SatoriError, match="'flag' must be true or false"):
        from_dict(Outer, {"flag": "maybe"})
    with pytest.raises(SatoriError, match="'x' must be a number"):
        from_dict(Outer, {"x": [1]})
    assert from_dict(Outer, {"name": "null"}).name is None


def test_validate_hooks_reject_impossible_values():
    with pytest.raises(SatoriError, match="data.format"):
        from_dict(DataConfig, {"format": "csv"})
    with pytest.raises(SatoriError, match="k must be >= 0"):
        load_config(EvalConfig, overrides={"k": -1})
    # inside a larger config, the error names the section the value is in
    from satori.pipeline import PipelineConfig

    with pytest.raises(SatoriError, match=r"^distill\.sft: save_every and eval_every must be > 0"):
        load_config(PipelineConfig, overrides={"distill.sft.save_every": 0})
    with pytest.raises(SatoriError, match=r"^orm: "):
        load_config(PipelineConfig, overrides={"orm.eval_every": 0})


def test_invalid_yaml_names_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(SatoriError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(Outer, y)
    with pytest.raises(SatoriError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_partly_given_section_keeps_the_commands_defaults():
    from satori.train.ppo import RLConfig

    cfg = from_dict(RLConfig, {"data": {"n": 16}})
    assert cfg.data.path == "testbed:train" and cfg.data.n == 16
    p = argparse.ArgumentParser()
    add_config_arguments(p, RLConfig)
    assert config_from_args(RLConfig, p.parse_args(["--data.n", "7"])).data.path == "testbed:train"


def test_a_mapping_flag_is_read_as_yaml():
    from satori.train.sft import SFTConfig

    cfg = parse(SFTConfig, ["--coat-init-text", '{reflect: "\\n\\nCheck:\\n", explore: ". "}'])
    assert cfg.coat_init_text == {"reflect": "\n\nCheck:\n", "explore": ". "}
    with pytest.raises(SatoriError, match="'coat_init_text' must be a mapping"):
        parse(SFTConfig, ["--coat-init-text", "reflect"])
    with pytest.raises(SatoriError, match="must be a mapping"):
        parse(SFTConfig, ["--coat-init-text", "{unclosed"])


def test_a_switch_given_alone_is_on():
    from satori.pipeline import RunConfig

    assert parse(RunConfig, ["--dry-run"]).dry_run is True
    assert parse(RunConfig, ["--dry-run", "false"]).dry_run is False
    assert parse(RunConfig, []).dry_run is False
    with pytest.raises(SatoriError, match="must be true or false"):
        parse(RunConfig, ["--dry-run", "maybe"])
