"""Layers. Every non-smooth layer takes its kink choice as an argument (``ReLU(at_kink=1.0)``,
``MaxPool2d(2, ties="split")``); ``None`` means the policy in force when the layer runs."""

from __future__ import annotations

import numpy as np

from .. import primitives as P
from ..precision import as_dtype
from . import init
from .module import Module, Parameter, default_rng


def _rng(rng) -> np.random.Generator:
    if rng is None:
        return default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


class Linear(Module):
    """y = x Wᵀ + b with W of shape (out, in); PyTorch's default initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None,
                 dtype="float32"):
        super().__init__()
        dtype = as_dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.empty((out_features, in_features), dtype))
        self.bias = Parameter(np.empty(out_features, dtype)) if bias else None
        init.torch_default_(self.weight, self.bias, _rng(rng))

    def forward(self, x):
        return P.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution (NCHW), weights (out, in, kh, kw); PyTorch's default initialisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, rng=None, dtype="float32"):
        super().__init__()
        dtype = as_dtype(dtype)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride, self.padding = stride, padding
        self.weight = Parameter(np.empty((out_channels, in_channels, kh, kw), dtype))
        self.bias = Parameter(np.empty(out_channels, dtype)) if bias else None
        init.torch_default_(self.weight, self.bias, _rng(rng))

    def forward(self, x):
        return P.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self):
        o, i, kh, kw = self.weight.shape
        return f"{i}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}"


class MaxPool2d(Module):
    """Max pooling; ``ties`` ("first", "last", "split", "directional") or the policy in force."""

    def __init__(self, kernel_size, stride=None, padding=0, ties=None):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.ties = kernel_size, stride, padding, ties

    def forward(self, x):
        return P.max_pool2d(x, self.kernel_size, self.stride, self.padding, ties=self.ties)

    def extra_repr(self):
        return f"{self.kernel_size}, stride={self.stride}, ties={self.ties}"


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return P.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


#: formats whose batch-norm trains through the one-record primitive (see _BatchNorm)
_ONE_RECORD = (np.dtype(np.float32), np.dtype(np.float64))


class _BatchNorm(Module):
    """Batch normalisation as PyTorch: normalise with the batch's biased variance in training,
    update running statistics with momentum (running_var with the unbiased variance), and use the
    running statistics in eval mode.

    Training in float32 / float64 runs the one-record :func:`kinkprop.batch_norm`. The 16-bit and
    8-bit formats keep the composed form (mean, sub, mul, div, add primitives, each rounding its
    result to the storage format), with which the study's batch-norm results were measured; the
    one-record form would round once, as PyTorch's float32-accumulating kernels do."""

    axes: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, dtype="float32"):
        super().__init__()
        dtype = as_dtype(dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype)) if affine else None
        self.register_buffer("running_mean", np.zeros(num_features, dtype))
        self.register_buffer("running_var", np.ones(num_features, dtype))

    def _shape(self, ndim):
        return (1, self.num_features) + (1,) * (ndim - 2)

    def forward(self, x):
        if x.ndim != len(self.axes) + 1 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) at {self.path!r}: "
                             f"got input of shape {x.shape}")
        shape = self._shape(x.ndim)
        if self.training and x.dtype in _ONE_RECORD:
            stats: dict = {}
            y = P.batch_norm(x, self.weight, self.bias, self.eps, stats=stats)
            self._update_running(stats["mean"], stats["var"], x.size // self.num_features)
            return y
        if self.training:
            mean = P.mean(x, axis=self.axes, keepdims=True)
            centred = x - mean
            var = P.mean(centred * centred, axis=self.axes, keepdims=True)
            self._update_running(mean.data.reshape(-1), var.data.reshape(-1),
                                 x.size // self.num_features)
            y = centred / P.sqrt(var + self.eps)
        else:
            mean = self.running_mean.reshape(shape)
            y = (x - mean) / np.sqrt(self.running_var.reshape(shape) + self.eps).astype(
                self.running_var.dtype)
        if self.weight is not None:
            y = y * P.reshape(self.weight, shape) + P.reshape(self.bias, shape)
        return y

    def _update_running(self, mean, var, n):
        """Running statistics with momentum; the variance unbiased (n / (n - 1)), as PyTorch."""
        m = self.momentum
        rm = self.running_mean
        rm *= 1 - m
        rm += m * mean.astype(rm.dtype)
        rv = self.running_var
        rv *= 1 - m
        rv += m * (var * (n / max(n - 1, 1))).astype(rv.dtype)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch-norm over (N, C) inputs."""

    axes = (0,)


class BatchNorm2d(_BatchNorm):
    """Batch-norm over (N, C, H, W) inputs, per channel."""

    axes = (0, 2, 3)


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability p and scale by 1/(1-p),
    with masks drawn from a seeded generator (``rng``); identity in eval mode."""

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.rng = _rng(rng)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = (self.rng.random(x.shape) >= self.p) / (1 - self.p)
        return x * keep.astype(x.dtype)


class Flatten(Module):
    def __init__(self, start_dim: int = 1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x):
        return P.flatten(x, self.start_dim)


class Identity(Module):
    def forward(self, x):
        return x


class ReLU(Module):
    """max(x, 0); derivative ``at_kink`` at 0 (None: the policy in force)."""

    def __init__(self, at_kink=None):
        super().__init__()
        self.at_kink = at_kink

    def forward(self, x):
        return P.relu(x, at_kink=self.at_kink)

    def extra_repr(self):
        return "" if self.at_kink is None else f"at_kink={self.at_kink}"


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01, at_kink=None):
        super().__init__()
        self.negative_slope, self.at_kink = negative_slope, at_kink

    def forward(self, x):
        return P.leaky_relu(x, self.negative_slope, at_kink=self.at_kink)


class ReLU6(Module):
    def __init__(self, at_kink=None):
        super().__init__()
        self.at_kink = at_kink

    def forward(self, x):
        return P.relu6(x, at_kink=self.at_kink)


class Hardtanh(Module):
    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, at_kink=None):
        super().__init__()
        self.min_val, self.max_val, self.at_kink = min_val, max_val, at_kink

    def forward(self, x):
        return P.hardtanh(x, self.min_val, self.max_val, at_kink=self.at_kink)


class Hardswish(Module):
    def __init__(self, at_kink=None):
        super().__init__()
        self.at_kink = at_kink

    def forward(self, x):
        return P.hardswish(x, at_kink=self.at_kink)


class Sigmoid(Module):
    def forward(self, x):
        return P.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return P.tanh(x)
