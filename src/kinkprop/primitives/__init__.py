"""Primitives, one record each (forward, VJP, JVP, kink spec), grouped by family."""

from .conv import avg_pool2d, conv2d, max_pool2d
from .core import PRIMITIVES, Primitive, site
from .elementwise import (
                          add,
                          div,
                          exp,
                          log,
                          log1p,
                          mul,
                          neg,
                          pow,
                          sigmoid,
                          softplus,
                          sqrt,
                          sub,
                          tanh,
                          where,
)
from .linalg import linear, matmul
from .losses import cross_entropy, hinge_loss, l1_loss, mse_loss
from .nonsmooth import (
                          UnresolvedKinkError,
                          abs,
                          clamp,
                          hardswish,
                          hardtanh,
                          leaky_relu,
                          max,
                          maximum,
                          min,
                          minimum,
                          relu,
                          relu6,
)
from .norm import batch_norm
from .reductions import log_softmax, logsumexp, mean, softmax, sum, var
from .shape import (
                          broadcast_to,
                          cat,
                          concatenate,
                          expand_dims,
                          flatten,
                          getitem,
                          pad,
                          permute,
                          reshape,
                          squeeze,
                          stack,
                          swapaxes,
                          transpose,
                          unsqueeze,
)

__all__ = [
    "PRIMITIVES", "Primitive", "site", "UnresolvedKinkError",
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "log1p", "sqrt", "tanh", "sigmoid",
    "softplus", "where", "matmul", "linear", "sum", "mean", "var", "softmax", "log_softmax",
    "logsumexp", "reshape", "transpose", "permute", "swapaxes", "broadcast_to", "expand_dims",
    "unsqueeze", "squeeze", "flatten", "concatenate", "cat", "stack", "pad", "getitem",
    "conv2d", "avg_pool2d", "max_pool2d", "cross_entropy", "mse_loss", "l1_loss", "hinge_loss",
    "relu", "leaky_relu", "abs", "relu6", "hardtanh", "hardswish", "clamp", "maximum", "minimum",
    "max", "min", "batch_norm",
]
