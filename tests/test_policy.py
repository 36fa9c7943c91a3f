"""Policies, presets and the conventions table: data, parsed and printed from the registry."""

from __future__ import annotations

import re

import numpy as np
import pytest

import kinkprop as kp
from kinkprop.kinks import PRESETS, SPECS, KinkSpec, Policy, make_policy, parse_policy
from kinkprop.kinks.presets import DEFAULT_PRESET
from kinkprop.kinks.spec import Kink

FRAMEWORK_VERSION = re.compile(r"^(PyTorch|JAX|TensorFlow) \d+\.\d+(\.\d+)? \(CPU\)$")


# -- parse_policy --------------------------------------------------------------------------------


def test_parse_preset_with_overrides():
    pol = parse_policy("jax,relu=0.5,clamp=1:0")
    assert pol["relu"] == 0.5
    assert pol["clamp"] == (1.0, 0.0)
    jax = Policy.from_preset("jax")
    assert {k: v for k, v in pol.values.items() if k not in ("relu", "clamp")} == \
        {k: v for k, v in jax.values.items() if k not in ("relu", "clamp")}
    assert pol["abs"] == 1.0 and pol["leaky_relu"] == "right"  # the rest is JAX's
    assert pol.label.startswith("jax+")


def test_parse_without_preset_starts_from_the_default():
    pol = parse_policy("relu=1")
    assert DEFAULT_PRESET == "pytorch"
    assert pol == Policy.from_preset("pytorch").with_overrides(relu=1.0)
    assert pol["clamp"] == (1.0, 1.0)


@pytest.mark.parametrize("text, key, value", [
    ("max_pool2d=split", "max_pool2d", "split"),
    ("tensorflow,maximum=last", "maximum", "last"),
    ("leaky_relu=right", "leaky_relu", "right"),
    ("clamp=left:0.25", "clamp", ("left", 0.25)),
    ("hardtanh=0:1", "hardtanh", (0.0, 1.0)),
    ("abs=-1", "abs", -1.0),
    ("l1_loss=1e-1", "l1_loss", 0.1),
    (" jax , relu = 0.5 ", "relu", 0.5),
    ("pytorch-2.14", "clamp", (0.0, 0.0)),
    ("relu=directional", "relu", "directional"),
])
def test_parse_values(text, key, value):
    assert parse_policy(text)[key] == value


def test_parse_directional_preset():
    pol = parse_policy("directional")
    assert pol.uses_directional and set(pol.values.values()) == {"directional"}
    assert not parse_policy("jax").uses_directional


def test_parsed_policy_drives_the_gradient():
    with kp.kink_policy(parse_policy("jax,relu=0.5,clamp=1:0")):
        g = kp.grad(lambda x: (kp.relu(x) + kp.clamp(x, 0, 1) + kp.abs(x)).sum())(
            np.array([0.0, 1.0]))
    assert np.array_equal(g, [0.5 + 1 + 1, 1 + 0 + 1])


# -- Policy objects ----------------------------------------------------------------------------------


def test_policy_covers_every_primitive_and_is_immutable():
    pol = make_policy("jax")
    assert set(pol.values) == set(SPECS)
    with pytest.raises(TypeError):
        pol.values["relu"] = 1.0
    with pytest.raises(ValueError, match="lacks"):
        Policy({"relu": 0.0}, "partial")


def test_policy_equality_and_hash_follow_the_values():
    a = make_policy("pytorch", relu=1.0)
    b = parse_policy("pytorch,relu=1")
    assert a == b and hash(a) == hash(b)
    assert a != make_policy("pytorch")
    # TensorFlow and PyTorch 2.13 differ (hardtanh, maximum, ...), so do their policies
    assert make_policy("tensorflow") != make_policy("pytorch")


def test_overrides_stack_on_the_policy_in_force_and_scopes_restore():
    assert kp.current_policy() == Policy.from_preset(DEFAULT_PRESET)
    with kp.kink_policy("jax"):
        with kp.kink_policy(relu=1.0) as inner:
            assert inner["relu"] == 1.0 and inner["abs"] == 1.0  # jax kept underneath
        assert kp.current_policy()["relu"] == 0.0
        with pytest.raises(RuntimeError), kp.kink_policy(relu=0.5):
            raise RuntimeError("inside")
        assert kp.current_policy() == Policy.from_preset("jax")
    assert kp.current_policy() == Policy.from_preset(DEFAULT_PRESET)


def test_kink_policy_accepts_a_policy_object():
    pol = make_policy("tensorflow", max_pool2d="last")
    with kp.kink_policy(pol) as got:
        assert got is pol
    with kp.kink_policy(pol, relu=1.0) as got:
        assert got["relu"] == 1.0 and got["max_pool2d"] == "last" and got["maximum"] == "first"


# -- presets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_name_a_framework_version_and_cover_the_registry(name):
    preset = PRESETS[name]
    assert preset.name == name
    assert FRAMEWORK_VERSION.match(preset.reproduces), preset.reproduces
    assert set(preset.values) == set(SPECS)
    for key, value in preset.values.items():
        assert SPECS[key].validate(value) == value  # stored already normalised


def test_the_four_presets():
    assert list(PRESETS) == ["pytorch", "pytorch-2.14", "jax", "tensorflow"]
    assert PRESETS["pytorch"].reproduces == "PyTorch 2.13.0 (CPU)"
    assert PRESETS["pytorch-2.14"].reproduces.startswith("PyTorch 2.14")
    assert PRESETS["jax"].reproduces.startswith("JAX ")
    assert PRESETS["tensorflow"].reproduces.startswith("TensorFlow ")


def test_preset_table_matches_references_section_4():
    # REFERENCES.md section 4, written out (the oracle test checks the PyTorch column against torch)
    table = {
        "relu": (0.0, 0.0, 0.0, 0.0),
        "leaky_relu": ("left", "left", "right", "left"),
        "abs": (0.0, 0.0, 1.0, 0.0),
        "relu6": ((0.0, 0.0),) * 4,
        "hardtanh": ((0.0, 0.0), (0.0, 0.0), (1.0, 1.0), (1.0, 1.0)),
        "clamp": ((1.0, 1.0), (0.0, 0.0), (0.5, 0.5), (1.0, 1.0)),
        "hardswish": ((0.0, 1.0),) * 4,  # TensorFlow: "-" in the table; inherits PyTorch's
        "maximum": ("split", "split", "split", "first"),
        "minimum": ("split", "split", "split", "first"),
        "max": ("split",) * 4,
        "min": ("split",) * 4,
        "max_axis": ("first", "first", "split", "split"),
        "min_axis": ("first", "first", "split", "split"),
        "max_pool2d": ("first",) * 4,
        "l1_loss": (0.0, 0.0, 1.0, 0.0),
    }
    assert set(table) == set(SPECS)
    for key, row in table.items():
        assert tuple(PRESETS[p].values[key] for p in PRESETS) == row, key


# -- the conventions table ----------------------------------------------------------------------------


def _rows(text):
    """{primitive: [kink, cell per preset]} from the printed table (columns split on 2+ spaces)."""
    lines = text.splitlines()
    out = {}
    for line in lines[2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        out[cells[0]] = cells[1:]
    return lines[0], out


def test_conventions_table_lists_every_primitive_and_preset(capsys):
    text = kp.conventions()
    assert capsys.readouterr().out.strip() == text.strip()  # printed too
    header, rows = _rows(text)
    assert re.split(r"\s{2,}", header.strip()) == ["primitive", "kink", *PRESETS]
    assert list(rows) == list(SPECS)
    assert rows["relu"] == ["x = 0", "0", "0", "0", "0"]
    assert rows["leaky_relu"] == ["x = 0", "left", "left", "right", "left"]
    assert rows["clamp"] == ["x = min / x = max", "1 / 1", "0 / 0", "0.5 / 0.5", "1 / 1"]
    assert rows["max_pool2d"] == ["ties", "first", "first", "first", "first"]
    for name, preset in PRESETS.items():
        assert f"{name}: reproduces {preset.reproduces}" in text
    assert "multiply the incoming gradient" in text


def test_conventions_table_is_generated_from_the_registry(monkeypatch, capsys):
    spec = KinkSpec("softsign_kink", "value", "made up", (Kink("x = 1", 0.0, 1.0),), "[0, 1]")
    monkeypatch.setitem(SPECS, "softsign_kink", spec)
    for i, preset in enumerate(PRESETS.values()):
        monkeypatch.setitem(preset.values, "softsign_kink", 0.25 * i)
    _, rows = _rows(kp.conventions())
    assert rows["softsign_kink"] == ["x = 1", "0", "0.25", "0.5", "0.75"]


def test_conventions_to_a_file(tmp_path):
    path = tmp_path / "conventions.txt"
    with path.open("w") as f:
        text = kp.conventions(file=f)
    assert path.read_text().strip() == text.strip()
