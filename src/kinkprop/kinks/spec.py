"""Kink specifications: where each non-smooth primitive is non-differentiable, as data.

Every non-smooth primitive owns one :class:`KinkSpec`. It says where the kinks are, the one-sided
derivatives on either side of each, the Clarke interval, and which *kind* of choice a policy makes
there:

``"value"``  one elementwise kink; the policy gives the derivative used at the kink (a number, or
             ``"left"`` / ``"right"`` for the one-sided derivative from that side).
``"pair"``   two elementwise kinks (clamp, hardtanh, relu6, hardswish); the policy gives
             ``(at_low, at_high)``.
``"ties"``   several inputs share the winning value (maximum, max reductions, max-pool windows); the
             policy names how the gradient is shared: ``"split"`` (equal shares), ``"first"`` or
             ``"last"`` (row-major order, all of it to one input).

Every kind also accepts ``"directional"``: the piece active along a direction (see
:mod:`kinkprop.kinks.directional`).

The chosen value always *multiplies* the incoming gradient (chain rule); it never replaces it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

TIES = ("split", "first", "last")
#: Comparison arm only: ``"replace:a"`` *replaces* the incoming gradient at the kink by a, as the
#: public code of Bertoin et al. (2021) does (``grad_input[input == 0] = alpha``). It is not the
#: chain rule; kinkprop offers it so that paper's training results can be re-examined.
REPLACE = "replace"
SIDES = ("left", "right")
DIRECTIONAL = "directional"


@dataclass(frozen=True)
class Kink:
    """One elementwise kink: location and one-sided derivatives (``"slope"`` = the call's slope)."""

    where: str
    left: float | str
    right: float | str


@dataclass(frozen=True)
class KinkSpec:
    name: str
    kind: str  # "value" | "pair" | "ties"
    doc: str
    kinks: tuple[Kink, ...] = ()
    clarke: str = ""
    _warned: set = field(default_factory=set, compare=False, repr=False)

    def one_sided(self, slope: float | None = None) -> list[tuple[float, float]]:
        """(left, right) derivative at each kink, with ``"slope"`` replaced by the call's slope."""

        def num(v):
            return slope if v == "slope" else v

        return [(num(k.left), num(k.right)) for k in self.kinks]

    # -- validation -------------------------------------------------------------------------------
    def validate(self, value):
        """Check a policy value for this primitive and return it normalised; raise ValueError."""
        if value == DIRECTIONAL:
            return DIRECTIONAL
        if self.kind == "ties":
            if value not in TIES:
                raise ValueError(
                    f"{self.name}: tie rule must be one of {', '.join(TIES)} or 'directional', "
                    f"got {value!r}"
                )
            return value
        if self.kind == "value":
            if isinstance(value, str) and value.startswith(REPLACE + ":"):
                alpha = self._validate_scalar(_number(value[len(REPLACE) + 1:]), "to replace with")
                return (REPLACE, alpha)
            if isinstance(value, tuple) and len(value) == 2 and value[0] == REPLACE:
                return (REPLACE, self._validate_scalar(value[1], "to replace with"))
            return self._validate_scalar(value, "at the kink")
        if isinstance(value, (str, numbers.Real)):
            raise ValueError(
                f"{self.name}: has two kinks; give a pair (at_low, at_high), got {value!r}"
            )
        try:
            low, high = value
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.name}: has two kinks; give a pair (at_low, at_high), got {value!r}"
            ) from None
        return (self._validate_scalar(low, "at the low kink"),
                self._validate_scalar(high, "at the high kink"))

    def _validate_scalar(self, v, where):
        if isinstance(v, str):
            if v not in SIDES:
                raise ValueError(
                    f"{self.name}: value {where} must be a finite number or one of "
                    f"{', '.join(SIDES)}, got {v!r}"
                )
            return v
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{self.name}: value {where} must be a finite number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{self.name}: value {where} must be finite, got {v}")
        return v

    def resolve(self, value, slope: float | None = None):
        """Numeric derivative(s) at the kink(s) for a validated value: float, or (low, high)."""
        if self.kind == "ties" or value == DIRECTIONAL or _is_replace(value):
            return value
        sides = self.one_sided(slope)
        values = (value,) if self.kind == "value" else value
        out = []
        for v, (left, right) in zip(values, sides):
            if v == "left":
                v = left
            elif v == "right":
                v = right
            else:
                lo, hi = min(left, right), max(left, right)
                if not lo <= v <= hi and self.name not in self._warned:
                    self._warned.add(self.name)
                    warnings.warn(
                        f"{self.name}: derivative {v} at the kink lies outside the Clarke interval "
                        f"[{lo}, {hi}]; the result is not a generalized gradient (warned once)",
                        stacklevel=4,
                    )
            out.append(float(v))
        return out[0] if self.kind == "value" else tuple(out)


def _number(text):
    try:
        return float(text)
    except ValueError:
        return text


def _is_replace(value) -> bool:
    return (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and value[0] == REPLACE)


def _value(name, where, left, right, doc, clarke):
    return KinkSpec(name, "value", doc, (Kink(where, left, right),), clarke)


def _pair(name, low, high, doc):
    return KinkSpec(name, "pair", doc, (Kink(low, 0.0, 1.0), Kink(high, 1.0, 0.0)),
                    "[0, 1] at each bound")


def _ties(name, doc):
    return KinkSpec(name, "ties", doc, clarke="convex hull of the tied inputs' unit vectors")


#: The registry: every non-smooth primitive and its kink, in the order tables print them.
SPECS: dict[str, KinkSpec] = {s.name: s for s in [
    _value("relu", "x = 0", 0.0, 1.0, "relu(x) = max(x, 0)", "[0, 1]"),
    _value("leaky_relu", "x = 0", "slope", 1.0, "x if x > 0 else slope * x", "[slope, 1]"),
    _value("abs", "x = 0", -1.0, 1.0, "|x|", "[-1, 1]"),
    _pair("relu6", "x = 0", "x = 6", "min(max(x, 0), 6)"),
    _pair("hardtanh", "x = min_val", "x = max_val", "min(max(x, min_val), max_val)"),
    _pair("clamp", "x = min", "x = max",
          "min(max(x, min), max); with tensor bounds a bound gets 1 - (x's share)"),
    KinkSpec("hardswish", "pair", "x * relu6(x + 3) / 6",
             (Kink("x = -3", 0.0, -0.5), Kink("x = 3", 1.5, 1.0)), "[-0.5, 0] at -3, [1, 1.5] at 3"),
    _ties("maximum", "elementwise max(a, b); ties a = b"),
    _ties("minimum", "elementwise min(a, b); ties a = b"),
    _ties("max", "max over all elements (axis=None)"),
    _ties("max_axis", "max along an axis"),
    _ties("min", "min over all elements (axis=None)"),
    _ties("min_axis", "min along an axis"),
    _ties("max_pool2d", "max over each pooling window"),
    _value("l1_loss", "input = target", -1.0, 1.0, "mean |input - target| (its own rule)",
           "[-1, 1] / n"),
]}
