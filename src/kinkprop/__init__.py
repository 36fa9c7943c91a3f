"""kinkprop: backpropagation through non-smooth networks, every kink an explicit, recorded choice.

    import kinkprop as kp
    x = kp.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    with kp.kink_policy(relu=1.0):
        kp.relu(x).sum().backward()
    x.grad  # [0., 1., 1.]
"""

from . import allocator, data, nn, optim, precision
from .autodiff import grad, jvp, value_and_grad, vjp
from .diagnostics.bifurcation import bifurcation_test
from .diagnostics.generalized import check_generalized as check_generalized
from .kinks import PRESETS, SPECS, census, conventions, current_policy, kink_policy, parse_policy
from .kinks.directional import directional_options
from .precision import bfloat16, float8_e4m3, float8_e5m2, float16, float32, float64
from .primitives import *  # noqa: F403
from .primitives import __all__ as _prims
from .tape import enable_grad, no_grad
from .tensor import Tensor, as_tensor, tensor

__version__ = "0.1.0"

allocator._at_import()  # keep freed memory for the next step (KINKPROP_MALLOC=system: don't)

__all__ = [
    "Tensor", "tensor", "as_tensor", "no_grad", "enable_grad", "grad", "value_and_grad", "vjp",
    "jvp", "census", "kink_policy", "current_policy", "parse_policy", "conventions",
    "directional_options", "bifurcation_test", "check_generalized",
    "PRESETS", "SPECS", "precision", "nn", "optim", "data", "float64", "float32", "float16",
    "bfloat16", "float8_e4m3", "float8_e5m2", *_prims,
]
