"""SGD (momentum, Nesterov, weight decay), Adam and AdamW, with PyTorch's update formulas.

Updates run in place through per-parameter scratch buffers allocated once, so a step makes no fresh
temporaries per parameter. Low-precision parameters (float16, bfloat16) follow the engine's rounding
contract: the update is computed in float32 and the result rounded to the parameter's format; the
optimizer state (momentum, moments) is kept in float32. float16 parameters and gradients come as
float32 images of their values, which are never written: the update goes into a new array,
rounded there and handed back as the new image (:mod:`kinkprop.storage`: packed into the
parameter's own array when it is read, or at once if that array is held elsewhere); bfloat16
ones go through float32 buffers allocated once, the rounded result written into the parameter's
own array.
"""

from __future__ import annotations

import math

import numpy as np

from ..precision import LOW_PRECISION, float16, float32, float_to_half, half_to_float, round_to_half
from ..storage import CARRIED


class Optimizer:
    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"{type(self).__name__}: lr must be a finite number >= 0, got {lr}")
        self.lr = float(lr)
        self.steps = 0
        self._state: dict[str, list[np.ndarray]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _buffers(self, name: str) -> list[np.ndarray]:
        """A zero-initialised float buffer per parameter (float32 for low-precision ones)."""
        if name not in self._state:
            self._state[name] = [np.zeros(p.shape, _work_dtype(p.dtype)) for p in self.params]
        return self._state[name]

    def step(self) -> None:
        self.steps += 1
        for i, p in enumerate(self.params):
            if p._grad is None:
                continue
            if p.dtype in CARRIED:  # float32 values of float16 in and out (kinkprop.storage)
                w, g = p._compute(), p._grad_compute()
                if g.dtype != float32:  # a .grad set in another format: in float32, as always
                    g = self._buffers("_grad32")[i]
                    np.copyto(g, p._grad_compute(), casting="unsafe")
                new = np.empty_like(w)  # the new image, once rounded (w itself is never written)
                self._update(i, w, g, new)
                p._assign(round_to_half(new, new))
            elif p.dtype in LOW_PRECISION:  # compute in float32, round the result once
                w, g = self._buffers("_param32")[i], self._buffers("_grad32")[i]
                _upcast(p.data, w)
                _upcast(p.grad, g)
                self._update(i, w, g, w)
                _round_into(w, p.data)
            else:  # in place; the gradient itself is only read
                w = p.data
                self._update(i, w, p.grad, w)

    def _update(self, i: int, w: np.ndarray, g: np.ndarray, out: np.ndarray) -> None:
        """Write parameter ``i``'s updated float values into ``out`` from its values ``w`` and its
        gradient ``g``. ``out`` is ``w`` itself (in place) or a separate array (for float16,
        whose ``w`` and ``g`` are read-only images); ``g`` is only read."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {f"{name}.{i}": b.copy() for name, bufs in self._state.items()
               if not name.startswith("_") for i, b in enumerate(bufs)}
        out["steps"] = np.asarray(self.steps)
        out["lr"] = np.asarray(self.lr)
        return out

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in ("steps", "lr"):
                continue
            name, i = key.rsplit(".", 1)
            bufs = self._buffers(name)
            if int(i) >= len(bufs) or bufs[int(i)].shape != np.shape(value):
                raise ValueError(f"optimizer state {key} of shape {np.shape(value)} does not "
                                 "match the parameters")
            bufs[int(i)][...] = value
        self.steps = int(state["steps"])
        self.lr = float(state["lr"])


def _work_dtype(dtype):
    return float32 if dtype in LOW_PRECISION else dtype


def _upcast(a: np.ndarray, out: np.ndarray) -> None:
    """out[...] = a in float32 (exact), through kinkprop's fast float16 cast."""
    if a.dtype == float16:
        half_to_float(a, out)
    else:
        np.copyto(out, a, casting="unsafe")


def _round_into(w: np.ndarray, data: np.ndarray) -> None:
    """data[...] = w rounded to nearest even, in place (the parameter keeps its array)."""
    if data.dtype == float16:
        float_to_half(w, data)
    else:
        data[...] = w


class SGD(Optimizer):
    """PyTorch's SGD: g += wd * w; buf = momentum * buf + (1 - dampening) * g (buf = g at the
    first step); g = g + momentum * buf if nesterov else buf; w -= lr * g."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0):
        super().__init__(params, lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.nesterov = momentum, nesterov
        self.weight_decay, self.dampening = weight_decay, dampening

    def _update(self, i, w, g, out):
        s = self._buffers("_scratch")[i]
        d = g
        if self.weight_decay:
            np.multiply(w, self.weight_decay, out=s)
            s += g
            d = s
        if self.momentum:
            buf = self._buffers("momentum")[i]
            if self.steps == 1:
                buf[...] = d
            else:
                buf *= self.momentum
                if self.dampening:
                    buf += (1 - self.dampening) * d
                else:
                    buf += d
            if self.nesterov:
                if d is s:
                    s += self.momentum * buf
                else:
                    np.multiply(buf, self.momentum, out=s)
                    s += d
                d = s
            else:
                d = buf
        np.multiply(d, self.lr, out=s)
        np.subtract(w, s, out=out)


class Adam(Optimizer):
    """PyTorch's Adam: m, v moving averages; w -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps);
    ``weight_decay`` adds wd * w to the gradient (L2), unlike AdamW."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def _update(self, i, w, g, out):
        s = self._buffers("_scratch")[i]
        if self.weight_decay:
            if self.decoupled:
                np.multiply(w, 1 - self.lr * self.weight_decay, out=out)
                w = out
            else:
                g2 = self._buffers("_scratch2")[i]
                np.multiply(w, self.weight_decay, out=g2)
                g2 += g
                g = g2
        m, v = self._buffers("exp_avg")[i], self._buffers("exp_avg_sq")[i]
        m *= self.beta1
        np.multiply(g, 1 - self.beta1, out=s)
        m += s
        v *= self.beta2
        np.multiply(g, g, out=s)
        s *= 1 - self.beta2
        v += s
        bc1 = 1 - self.beta1 ** self.steps
        bc2_sqrt = math.sqrt(1 - self.beta2 ** self.steps)
        np.sqrt(v, out=s)
        s /= bc2_sqrt
        s += self.eps
        np.divide(m, s, out=s)
        s *= self.lr / bc1
        np.subtract(w, s, out=out)


class AdamW(Adam):
    """Adam with decoupled weight decay: w *= 1 - lr * wd before the Adam step (default wd 0.01)."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
