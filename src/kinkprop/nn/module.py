"""Module, Parameter and Sequential, with PyTorch's familiar shape.

Modules know their dotted path inside the model they belong to (``features.3``); non-smooth
primitives applied inside a module's forward are recorded under that path (its *site*), so census
and directional reports can name layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from ..precision import as_dtype, is_float
from ..primitives.core import site
from ..tensor import Tensor

_default_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the generator layers use when built without an explicit ``rng``."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def default_rng() -> np.random.Generator:
    return _default_rng


class Parameter(Tensor):
    """A tensor that a Module registers as trainable; requires grad."""

    __slots__ = ()

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)


class Module:
    """Base class: assign Parameters, buffers (``register_buffer``) and sub-Modules as attributes."""

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "path", "")

    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               "before assigning attributes")
        for table in (self._params, self._buffers, self._modules):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
            value._set_path(f"{self.path}.{name}" if self.path else name)
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value: np.ndarray) -> None:
        """A non-trainable array saved in ``state_dict`` (e.g. batch-norm running statistics)."""
        self._buffers[name] = np.asarray(value)
        object.__setattr__(self, name, self._buffers[name])

    def _set_buffer(self, name: str, value: np.ndarray) -> None:
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    def _set_path(self, path: str) -> None:
        object.__setattr__(self, "path", path)
        for name, m in self._modules.items():
            m._set_path(f"{path}.{name}")

    # -- calling -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} defines no forward()")

    def __call__(self, *args, **kwargs):
        with site(self.path or type(self).__name__.lower()):
            return self.forward(*args, **kwargs)

    # -- traversal -----------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def children(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._params.items():
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> Iterator[tuple[str, np.ndarray]]:
        for mod_name, m in self.named_modules():
            for name, b in m._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), b

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, dtype) -> Module:
        """Convert parameters and float buffers to another storage format (in place)."""
        dtype = as_dtype(dtype)
        for m in self.modules():
            for p in m._params.values():
                p.data = p.data.astype(dtype)
                p.grad = None
            for name, b in list(m._buffers.items()):
                if is_float(b.dtype):
                    m._set_buffer(name, b.astype(dtype))
        return self

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Copies of every parameter and buffer, by dotted name."""
        out = OrderedDict((n, p.data.copy()) for n, p in self.named_parameters())
        out.update((n, np.array(b, copy=True)) for n, b in self.named_buffers())
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into parameters and buffers; shapes must match. With ``strict``, the keys
        must match exactly. Nothing is changed unless every entry checks out."""
        own = dict(self.named_parameters())
        bufs = {n: (m, name) for mod_name, m in self.named_modules()
                for name in m._buffers for n in [f"{mod_name}.{name}" if mod_name else name]}
        missing = [k for k in [*own, *bufs] if k not in state]
        unexpected = [k for k in state if k not in own and k not in bufs]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
        for k, v in state.items():
            target = own[k] if k in own else (bufs[k][0]._buffers[bufs[k][1]]
                                              if k in bufs else None)
            if target is not None and np.shape(v) != target.shape:
                raise ValueError(f"load_state_dict: {k} has shape {np.shape(v)}, the model "
                                 f"expects {target.shape}")
        for k, v in state.items():
            if k in own:
                own[k].data = np.array(v, dtype=own[k].dtype, copy=True)
            elif k in bufs:
                m, name = bufs[k]
                m._set_buffer(name, np.array(v, dtype=m._buffers[name].dtype, copy=True))

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")


class Sequential(Module):
    """Modules applied in order; children are named ``0``, ``1``, …"""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a Module")
            setattr(self, str(i), layer)

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)
