"""Models by name: ``mlp``, ``lenet`` and ``convnet``, for image (C, H, W) or signal (C, L) inputs.

Signals (MNIST-1D) are treated as images of height 1, with (1, k) kernels and (1, 2) pooling.
"""

from __future__ import annotations

import numpy as np

from .layers import BatchNorm1d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU
from .module import Module, Sequential


class Reshape(Module):
    """Reshape every sample to ``shape`` (the batch axis is kept)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


def _image_shape(input_shape):
    if len(input_shape) == 3:
        return tuple(input_shape), False
    if len(input_shape) == 2:
        return (input_shape[0], 1, input_shape[1]), True
    raise ValueError(f"conv models need (C, H, W) or (C, L) inputs, got {input_shape}")


def mlp(input_shape, num_classes: int, widths=(256, 128, 100), batch_norm: bool = False,
        rng=None, dtype="float32", **_) -> Sequential:
    """Flatten, then Linear-(BatchNorm1d)-ReLU per hidden width, then a Linear classifier."""
    rng = np.random.default_rng(rng)
    layers, n = [Flatten()], int(np.prod(input_shape))
    for w in widths:
        layers.append(Linear(n, w, rng=rng, dtype=dtype))
        if batch_norm:
            layers.append(BatchNorm1d(w, dtype=dtype))
        layers.append(ReLU())
        n = w
    layers.append(Linear(n, num_classes, rng=rng, dtype=dtype))
    return Sequential(*layers)


def _conv_stack(input_shape, channels, kernel, rng, dtype, batch_norm, conv_padding):
    (c, h, w), is_1d = _image_shape(input_shape)
    kern = (1, kernel) if is_1d else kernel
    pad = (0, conv_padding) if is_1d else conv_padding
    pool = (1, 2) if is_1d else 2
    layers = [Reshape((c, h, w))] if is_1d else []
    for out in channels:
        layers.append(Conv2d(c, out, kern, padding=pad, rng=rng, dtype=dtype))
        if batch_norm:
            layers.append(BatchNorm2d(out, dtype=dtype))
        layers += [ReLU(), MaxPool2d(pool)]
        c = out
        kh = 1 if is_1d else kernel
        h = (h + 2 * (0 if is_1d else conv_padding) - kh + 1) // (1 if is_1d else 2)
        w = (w + 2 * conv_padding - kernel + 1) // 2
    return layers, c * h * w


def lenet(input_shape, num_classes: int, batch_norm: bool = False, rng=None, dtype="float32",
          **_) -> Sequential:
    """LeNet-5-like: conv(6, 5x5, pad 2)-relu-maxpool, conv(16, 5x5)-relu-maxpool, 120-84-classes."""
    rng = np.random.default_rng(rng)
    (c, h, w), is_1d = _image_shape(input_shape)
    layers = [Reshape((c, h, w))] if is_1d else []
    k = (1, 5) if is_1d else 5
    pool = (1, 2) if is_1d else 2
    layers += [Conv2d(c, 6, k, padding=(0, 2) if is_1d else 2, rng=rng, dtype=dtype)]
    layers += [BatchNorm2d(6, dtype=dtype)] if batch_norm else []
    layers += [ReLU(), MaxPool2d(pool), Conv2d(6, 16, k, rng=rng, dtype=dtype)]
    layers += [BatchNorm2d(16, dtype=dtype)] if batch_norm else []
    layers += [ReLU(), MaxPool2d(pool)]
    h2 = h if is_1d else ((h // 2) - 4) // 2
    w2 = ((w // 2) - 4) // 2
    layers += [Flatten(), Linear(16 * h2 * w2, 120, rng=rng, dtype=dtype), ReLU(),
               Linear(120, 84, rng=rng, dtype=dtype), ReLU(),
               Linear(84, num_classes, rng=rng, dtype=dtype)]
    return Sequential(*layers)


def convnet(input_shape, num_classes: int, channels=(32, 64), hidden: int = 128,
            batch_norm: bool = False, rng=None, dtype="float32", **_) -> Sequential:
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks (optional batch-norm), then hidden-classes."""
    rng = np.random.default_rng(rng)
    layers, n = _conv_stack(input_shape, channels, 3, rng, dtype, batch_norm, conv_padding=1)
    layers += [Flatten(), Linear(n, hidden, rng=rng, dtype=dtype)]
    layers += [BatchNorm1d(hidden, dtype=dtype)] if batch_norm else []
    layers += [ReLU(), Linear(hidden, num_classes, rng=rng, dtype=dtype)]
    return Sequential(*layers)


MODELS = {"mlp": mlp, "lenet": lenet, "convnet": convnet}


def build_model(name: str, input_shape, num_classes: int, seed=0, dtype="float32", **options):
    """Build a model by name with weights drawn from ``numpy.random.default_rng(seed)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes, rng=np.random.default_rng(seed),
                        dtype=dtype, **options)
