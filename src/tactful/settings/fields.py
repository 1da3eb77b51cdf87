"""How a setting is declared (``setting``: its variable, default, doc and checks) and how a
group of settings is read from the environment (``load_group``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import field
from typing import Any


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def setting(env: str, default: Any, doc: str, **checks: Any) -> Any:
    """A field of a settings group, read from ``env``; ``doc`` is its row in the table
    ``python -m tactful settings`` prints, ``checks`` what ``load_group`` enforces (``min``,
    ``max``, ``choices``, ``per_channel``, ``parse``; ``secret`` keeps its value out of
    errors)."""
    return field(default=default, metadata={"env": env, "doc": doc, **checks})


def load_group(group_cls: Any, env: Mapping[str, str], errors: list[str]) -> Any:
    """The group read from ``env`` (defaults for what it does not set); each bad value is
    added to ``errors``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(group_cls):
        name = f.metadata["env"]
        if name not in env:
            continue
        try:
            values[f.name] = _parse(f, env[name])
        except ValueError as exc:
            shown = name if f.metadata.get("secret") else f"{name}={env[name]!r}"
            errors.append(f"{shown}: {exc}")
    return group_cls(**values)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    meta = f.metadata
    kind: Any = type(f.default)
    value: Any
    if "parse" in meta:
        return meta["parse"](raw)
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
            raise ValueError("expected true or false")
        value = lowered in {"1", "true", "yes", "on"}
    elif kind is int:
        value = int(raw)
    elif kind is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
    elif meta.get("per_channel"):
        value = _parse_per_channel(raw, meta)
        return value
    elif kind is tuple:
        value = tuple(part.strip() for part in raw.split(",") if part.strip())
    else:
        value = raw
    if "min" in meta and value < meta["min"]:
        raise ValueError(f"must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ValueError(f"must be <= {meta['max']}")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(meta['choices'])}")
    return value


def _parse_per_channel(raw: str, meta: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """``email=2,push=3`` -> (("email", 2.0), ("push", 3.0)), each number range-checked."""
    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        channel, sep, number = part.partition("=")
        channel = channel.strip()
        if not sep or not channel:
            raise ValueError(f"{part!r}: expected channel=number, e.g. email=2")
        value = float(number)
        if not math.isfinite(value) or value < meta.get("min", 0) or value > meta["max"]:
            raise ValueError(f"{part!r}: must be between {meta.get('min', 0)} and {meta['max']}")
        out.append((channel, value))
    return tuple(out)
