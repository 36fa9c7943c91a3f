"""Framework presets: what real frameworks compute at each kink, as data naming the version.

Measured on CPU (see ../shared/REFERENCES.md section 4, ``tests/test_oracle_torch.py`` and
``tests/test_oracle_jax.py``).
``"left"`` / ``"right"`` mean the one-sided derivative from that side of the kink (for leaky_relu,
``"left"`` is the slope). Tie rules: ``"split"`` equal shares, ``"first"`` / ``"last"`` in row-major
order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    reproduces: str
    values: dict


_PYTORCH_2_13 = {
    "relu": 0.0,
    "leaky_relu": "left",
    "abs": 0.0,
    "relu6": (0.0, 0.0),
    "hardtanh": (0.0, 0.0),
    "clamp": (1.0, 1.0),
    # hardswish: the left derivative at -3, the right one at 3 (jax.nn.hard_swish in JAX 0.10.2
    # gives the same, both modes; TensorFlow has no hardswish op: its entry is inherited, unmeasured)
    "hardswish": (0.0, 1.0),
    "maximum": "split",
    "minimum": "split",
    "max": "split",
    "max_axis": "first",
    "min": "split",
    "min_axis": "first",
    "max_pool2d": "first",
    "l1_loss": 0.0,
}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("pytorch", "PyTorch 2.13.0 (CPU)", _PYTORCH_2_13),
    Preset("pytorch-2.14", "PyTorch 2.14.1 (CPU)", {**_PYTORCH_2_13, "clamp": (0.0, 0.0)}),
    Preset("jax", "JAX 0.10.2 (CPU)", {
        **_PYTORCH_2_13,
        "leaky_relu": "right",
        "abs": 1.0,
        "hardtanh": (1.0, 1.0),
        "clamp": (0.5, 0.5),
        # jnp.max / jnp.min share ties equally, with or without an axis
        "max_axis": "split",
        "min_axis": "split",
        "l1_loss": 1.0,
    }),
    Preset("tensorflow", "TensorFlow 2.21 (CPU)", {
        **_PYTORCH_2_13,
        "hardtanh": (1.0, 1.0),
        "maximum": "first",
        "minimum": "first",
        # tf.reduce_max / reduce_min share ties equally, with or without an axis
        "max_axis": "split",
        "min_axis": "split",
    }),
]}

DEFAULT_PRESET = "pytorch"
