"""Kinks as data: specs, presets, policies and the directional resolution."""

from .census import Census, census
from .policy import Policy, conventions, current_policy, kink_policy, make_policy, parse_policy
from .presets import DEFAULT_PRESET, PRESETS
from .spec import DIRECTIONAL, SPECS, KinkSpec

__all__ = ["Census", "census", "Policy", "conventions", "current_policy", "kink_policy", "make_policy",
           "parse_policy", "DEFAULT_PRESET", "PRESETS", "DIRECTIONAL", "SPECS", "KinkSpec"]
