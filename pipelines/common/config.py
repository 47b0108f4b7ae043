"""Typed job configuration: a dataclass per job, loaded from YAML, overridden from the command line.

    cfg = load_config(PretrainConfig, argv)   # argv: ["--config", "x.yaml", "--train.lr", "3e-4", ...]

Every field of the dataclass (nested dataclasses with dotted names) becomes a `--flag`, documented in
`--help` with its description, type and default; unknown YAML keys or flags are errors that name the key.
A field's description is the comment on its line in the dataclass source, or the comment line(s) right above
it: the source stays the one place where a setting is explained.

Storage is one setting for every job, not a field of each config: the global flag `--s3_endpoint URL` (or a
top-level `s3_endpoint:` in the YAML) sets AWS_ENDPOINT_URL for the process, which `Storage()` reads and
`init_ray()` forwards to the Ray workers.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _parse_scalar(t, text: str):
    """Turn a command-line string into a value of type t (int, float, bool, str, list, Optional)."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_scalar(args[0], text)
    if t is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if origin in (list, tuple) or t in (list, tuple):
        value = yaml.safe_load(text)
        if not isinstance(value, list):
            value = [v for v in str(text).split(",") if v]
        return list(value) if origin is list or t is list else tuple(value)
    if origin is dict or t is dict:
        return yaml.safe_load(text)
    if t in (int, float, str):
        return t(text)
    return yaml.safe_load(text)


def _check_value(t, value, key: str):
    origin = typing.get_origin(t)
    if value is None:
        return None
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is float and isinstance(value, str):
        return float(value)  # YAML reads "1e-4" as a string
    if t in (int, float, str, bool) and not isinstance(value, t):
        raise ValueError(f"config key {key!r}: expected {t.__name__}, got {value!r}")
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass `cls` from a nested dict, refusing unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(prefix + k for k in unknown)} for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        t = _field_type(cls, fields[name])
        if _is_dataclass_type(t):
            kwargs[name] = from_dict(t, value, prefix + name + ".")
        else:
            kwargs[name] = _check_value(t, value, prefix + name)
    return cls(**kwargs)


# comments that instruct tools, not readers
_DIRECTIVES = ("fmt:", "noqa", "type:", "pragma", "isort:")


def _comment_text(comment: str) -> str:
    parts = [p.strip() for p in comment.split("#")]
    return " ".join(p for p in parts if p and not p.startswith(_DIRECTIVES))


@functools.cache
def field_descriptions(cls) -> dict[str, str]:
    """{field name: description} from the comments of `cls`'s source and its dataclass bases' (see the
    module docstring); "" for a field without one."""
    out = {f.name: "" for f in dataclasses.fields(cls)}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update({k: v for k, v in _own_descriptions(base).items() if v})
    return out


def _own_descriptions(cls) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    trailing, whole_line = {}, {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            own_line = tok.line.strip().startswith("#")
            (whole_line if own_line else trailing)[tok.start[0]] = _comment_text(tok.string)
    out = {}
    for stmt in ast.parse(src).body[0].body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        lines = range(stmt.lineno, stmt.end_lineno + 1)
        text = " ".join(c for n in lines if (c := trailing.get(n) or (n > stmt.lineno and whole_line.get(n))))
        n = stmt.lineno - 1
        above = []
        while not text and n in whole_line:
            above.insert(0, whole_line[n])
            n -= 1
        out[stmt.target.id] = text or " ".join(a for a in above if a)
    return out


def _flat_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        t = _field_type(cls, f)
        if _is_dataclass_type(t):
            yield from _flat_fields(t, prefix + f.name + ".")
        else:
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            yield prefix + f.name, t, default, field_descriptions(cls).get(f.name, "")


STORAGE_FLAG = "s3_endpoint"


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", help="YAML file with the job's configuration (flags override it)")
    parser.add_argument(f"--{STORAGE_FLAG}", metavar="URL", default=None,
                        help="S3-compatible server of every s3:// URI of the job (sets AWS_ENDPOINT_URL; "
                             "default: AWS_ENDPOINT_URL, else AWS itself)")  # fmt: skip
    group = parser.add_argument_group(f"{cls.__name__} fields (override the YAML)")
    for name, t, default, help_text in _flat_fields(cls):
        tname = getattr(t, "__name__", str(t).replace("typing.", ""))
        group.add_argument(
            f"--{name}",
            dest=f"cfg::{name}",
            default=None,
            metavar=tname.upper() if isinstance(tname, str) else "VALUE",
            help=f"{help_text} (default: {default!r})".strip().replace("%", "%%"),
        )


def _set_storage(args: argparse.Namespace, data: dict) -> None:
    """The global storage setting: the flag wins over the YAML's top-level key."""
    from_yaml = data.pop(STORAGE_FLAG, None)
    endpoint = getattr(args, STORAGE_FLAG, None) or from_yaml
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config) as fh:
            data = yaml.safe_load(fh) or {}
    _set_storage(args, data)
    types_by_name = {name: t for name, t, _, _ in _flat_fields(cls)}
    for key, text in vars(args).items():
        if not key.startswith("cfg::") or text is None:
            continue
        name = key[len("cfg::") :]
        node = data
        parts = name.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        try:
            node[parts[-1]] = _parse_scalar(types_by_name[name], text)
        except ValueError as e:
            raise ValueError(f"--{name}: {e}") from None
    return from_dict(cls, data)


def load_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Parse argv (`--config FILE` plus per-field flags) into a `cls` instance."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    add_config_args(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))

