"""Typed configuration: dataclasses, YAML files and command-line overrides.

Every command has a dataclass config. Values come, in increasing priority, from the
dataclass defaults, an optional YAML file, and command-line flags. Flags are generated
from the fields: ``--max-new-tokens 256`` for a top-level field, ``--data.path x.jsonl``
for a field of a nested section, and any alias the class declares in ``__aliases__``
(``--data x.jsonl`` for ``data.path``). Unknown keys and values of the wrong type are
refused with a message naming the key, its section and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from satori.errors import SatoriError

T = TypeVar("T")
_NONE_WORDS = {"none", "null", "~"}


def _describe(where: str, key: str) -> str:
    return f"{where}: '{key}'" if where else f"'{key}'"


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert strings from the CLI."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except SatoriError as e:
                errors.append(str(e))
        raise SatoriError(errors[0] if errors else f"{_describe(where, key)} may not be null")
    if origin is Literal:
        if value not in args:
            raise SatoriError(f"{_describe(where, key)} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise SatoriError(f"{_describe(where, key)} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):  # a flag: '{reflect: "Check:"}' is read as YAML
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise SatoriError(f"{_describe(where, key)} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SatoriError(f"{_describe(where, key)} must be a section (mapping), got {value!r}")
        return from_dict(tp, value, where=f"{where}.{key}" if where else key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on", "false", "no", "0", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise SatoriError(f"{_describe(where, key)} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise SatoriError(f"{_describe(where, key)} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SatoriError(f"{_describe(where, key)} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise SatoriError(f"{_describe(where, key)} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise SatoriError(f"{_describe(where, key)} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SatoriError(f"{_describe(where, key)} must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise SatoriError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f" in section '{where}'" if where else ""
        raise SatoriError(
            f"unknown config key '{unknown[0]}'{section}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # a partly given section keeps this class's defaults for it, not the section type's
            default = _field_default(fields[name])
            if default is not None:
                value = _merge(to_dict(default), value)
        kwargs[name] = _coerce(value, tp, name, where)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise SatoriError(f"{where or cls.__name__}: {e}") from None
    validate = getattr(cls, "validate", None)
    if validate is not None:
        try:
            validate(obj)
        except SatoriError as e:  # name the section, e.g. "format_sft: save_every ... must be > 0"
            raise SatoriError(f"{where}: {e}" if where else str(e)) from None
    return obj


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for YAML, hashing and run records)."""
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise SatoriError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SatoriError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SatoriError(f"{p}: the config must be a mapping of keys to values")
    return data


def _leaf_fields(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, str]]:
    """All (path, type, help) leaves of a nested dataclass."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_leaf_fields(tp, prefix + (f.name,)))
        else:
            out.append((prefix + (f.name,), tp, f.metadata.get("help", "")))
    return out


def parse_settings(settings: list[str], cls: type | None = None) -> dict[str, Any]:
    """``["rl.steps=5", "seeds=[0]"]`` -> ``{"rl.steps": 5, "seeds": [0]}`` (``--set KEY=VALUE``): dotted keys,
    YAML values, except that a text setting of ``cls`` takes the value as written (``out=007`` stays
    ``"007"``, where YAML would read the number 7)."""
    text = {".".join(path) for path, tp, _ in _leaf_fields(cls) if tp is str} if cls is not None else set()
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SatoriError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set rl.steps=5")
        if key in text:
            out[key] = value
            continue
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise SatoriError(f"--set {item!r}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return out


def flag_name(path: tuple[str, ...]) -> str:
    return "--" + ".".join(p.replace("_", "-") for p in path)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config YAML`` and one flag per config leaf (all default to 'not given')."""
    parser.add_argument("--config", dest="_config_file", default=None, metavar="YAML",
                        help="YAML file with values for this command's options")
    aliases = {v: k for k, v in getattr(cls, "__aliases__", {}).items()}
    for path, tp, help_text in _leaf_fields(cls):
        dotted = ".".join(path)
        names = [flag_name(path)]
        if dotted in aliases:
            names.insert(0, "--" + aliases[dotted].replace("_", "-"))
        kind = "list" if get_origin(tp) in (list, tuple) else getattr(tp, "__name__", str(tp))
        # a switch given alone is on (``--dry-run``); ``--dry-run false`` still turns it off
        switch = {"nargs": "?", "const": "true"} if tp is bool else {}
        parser.add_argument(*names, dest="cfg:" + dotted, default=argparse.SUPPRESS, metavar=kind.upper()
                            if kind in ("int", "float", "str") else "VALUE", help=help_text or None, **switch)


def _set_path(d: dict[str, Any], path: list[str], value: Any) -> None:
    for p in path[:-1]:
        cur = d.get(p)
        if not isinstance(cur, dict):
            cur = {} if cur is None else cur
            d[p] = cur
        d = cur
    d[path[-1]] = value


def config_from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Defaults < ``base`` < ``--config`` YAML < flags; then type-check everything."""
    data: dict[str, Any] = dict(base or {})
    config_file = getattr(args, "_config_file", None)
    where = ""
    if config_file:
        data = _merge(data, load_yaml(config_file))
        where = str(config_file)
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            _set_path(data, key[4:].split("."), value)
    try:
        return from_dict(cls, data)
    except SatoriError as e:
        raise SatoriError(f"{where}: {e}" if where else str(e)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Programmatic twin of :func:`config_from_args`: YAML file then dotted-key overrides."""
    data = load_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        _set_path(data, key.split("."), value)
    try:
        return from_dict(cls, data)
    except SatoriError as e:
        raise SatoriError(f"{path}: {e}" if path else str(e)) from None


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check(condition: bool, message: str) -> None:
    """Raise a config error unless ``condition``; used by ``validate`` methods."""
    if not condition:
        raise SatoriError(message)


def validate_all(cfg: Any) -> None:
    """Run ``validate`` on every nested section, then on ``cfg`` itself.

    ``from_dict`` (YAML and flags) already does this; the training commands call it again
    first thing, so a config built or changed in Python is refused before any work too.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_all(value)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
