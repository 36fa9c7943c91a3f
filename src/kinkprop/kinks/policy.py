"""Kink policies: the choice in force at each kink, set per call or in a scope.

A :class:`Policy` maps every non-smooth primitive in :data:`~kinkprop.kinks.spec.SPECS` to its
choice. The policy in force when a primitive runs forward is recorded on its tape node; changing the
policy between forward and backward changes nothing.

    with kp.kink_policy("jax"):                 # a framework preset
        ...
    with kp.kink_policy("pytorch", relu=1.0):   # a preset with overrides
        ...
    with kp.kink_policy(max_pool2d="split"):    # overrides on top of the policy in force
        ...
    with kp.kink_policy("directional"):         # every kink resolved along a direction
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
from types import MappingProxyType

from ..textable import text_table
from .presets import DEFAULT_PRESET, PRESETS
from .spec import DIRECTIONAL, SPECS


def _unknown(kind, name, valid):
    return ValueError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


class Policy:
    """An immutable choice for every non-smooth primitive, with the preset it started from."""

    __slots__ = ("values", "label")

    def __init__(self, values: dict, label: str):
        missing = set(SPECS) - set(values)
        if missing:
            raise ValueError(f"policy {label!r} lacks {sorted(missing)}")
        self.values = MappingProxyType(dict(values))
        self.label = label

    @classmethod
    def from_preset(cls, name: str) -> Policy:
        if name == DIRECTIONAL:
            return cls({k: DIRECTIONAL for k in SPECS}, DIRECTIONAL)
        if name not in PRESETS:
            raise _unknown("kink-policy preset", name, [*PRESETS, DIRECTIONAL])
        return cls({k: SPECS[k].validate(v) for k, v in PRESETS[name].values.items()}, name)

    def with_overrides(self, **overrides) -> Policy:
        if not overrides:
            return self
        values = dict(self.values)
        for name, value in overrides.items():
            if name not in SPECS:
                raise _unknown("non-smooth primitive", name, SPECS)
            values[name] = SPECS[name].validate(value)
        extra = ",".join(f"{k}={v}" for k, v in overrides.items())
        return Policy(values, f"{self.label}+{extra}")

    def __getitem__(self, name: str):
        return self.values[name]

    def __eq__(self, other):
        return isinstance(other, Policy) and dict(self.values) == dict(other.values)

    def __hash__(self):
        return hash(tuple(sorted((k, str(v)) for k, v in self.values.items())))

    def __repr__(self):
        return f"Policy({self.label!r})"

    @property
    def uses_directional(self) -> bool:
        return any(v == DIRECTIONAL for v in self.values.values())


_current: contextvars.ContextVar[Policy] = contextvars.ContextVar(
    "kinkprop_policy", default=Policy.from_preset(DEFAULT_PRESET)  # noqa: B039 - Policy is immutable
)


def current_policy() -> Policy:
    """The policy in force in this context."""
    return _current.get()


def make_policy(preset: str | Policy | None = None, **overrides) -> Policy:
    """A policy from a preset name (or the one in force when ``None``) plus keyword overrides."""
    if preset is None:
        base = current_policy()
    elif isinstance(preset, Policy):
        base = preset
    else:
        base = Policy.from_preset(preset)
    return base.with_overrides(**overrides)


@contextlib.contextmanager
def kink_policy(preset: str | Policy | None = None, **overrides):
    """Scope in which non-smooth primitives use ``preset`` with ``overrides`` (see module doc)."""
    token = _current.set(make_policy(preset, **overrides))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def parse_policy(text: str) -> Policy:
    """Parse a CLI policy such as ``"jax"``, ``"relu=1.0"`` or ``"pytorch,relu=0.5,max_pool2d=split"``.

    Pairs are written ``clamp=1:0``.
    """
    preset, overrides = DEFAULT_PRESET, {}
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        if "=" not in part:
            if i:
                raise ValueError(f"preset {part!r} must come first in {text!r}")
            preset = part
            continue
        key, raw = (s.strip() for s in part.split("=", 1))
        overrides[key] = _parse_value(raw)
    return make_policy(preset, **overrides)


def _parse_value(raw: str):
    if ":" in raw:
        return tuple(_parse_value(r) for r in raw.split(":"))
    try:
        return float(raw)
    except ValueError:
        return raw


def conventions(file=None) -> str:
    """The table of non-smooth primitives x presets, generated from the registry; printed too."""
    names = list(PRESETS)
    header = ["primitive", "kink", *(f"{n}" for n in names)]
    rows = []
    for spec in SPECS.values():
        where = " / ".join(k.where for k in spec.kinks) if spec.kinks else "ties"
        rows.append([spec.name, where, *(_fmt(PRESETS[n].values[spec.name]) for n in names)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = text_table(header, [["-" * w for w in widths], *rows], align="left").split("\n")
    lines.append("")
    lines.extend(f"{n}: reproduces {p.reproduces}" for n, p in PRESETS.items())
    lines.append("Values multiply the incoming gradient; 'left'/'right' = one-sided derivative; "
                 "ties: split = equal shares, first/last in row-major order.")
    text = "\n".join(lines)
    print(text, file=file)
    return text


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return " / ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
