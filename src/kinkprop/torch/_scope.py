"""Scopes: what is in force (policy, census, directional tangents) and where (module path).

State is a per-thread stack of frames. Entering any kinkprop.torch scope (``kink_policy``,
``census``, the forward of a patched module) pushes a frame; the first one also pushes the one
:class:`KinkMode` (a ``TorchFunctionMode``) that reroutes the kink ops of :mod:`.ops`. Every other
torch call passes straight through, so nesting scopes never stacks modes.

Module paths come from one pair of *global* module hooks (installed while any module is registered
by :func:`name_modules` or ``patch``): a registered module pushes its path, and a patched one its
frame, for the duration of its forward; ``always_call`` pops them even when the forward raises.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode

from ..kinks.policy import Policy


@dataclass(frozen=True)
class Frame:
    """What is in force: ``policy`` (None: torch's own rules), ``census`` (None: no counting),
    ``directional`` (the driver that supplies tangents, when the policy uses ``"directional"``)."""

    policy: Policy | None = None
    census: Any = None
    directional: Any = None


_EMPTY = Frame()


class _TLS(threading.local):
    def __init__(self):
        self.frames: list[Frame] = []
        self.paths: list[str] = []
        self.mode: KinkMode | None = None
        self.hook_stack: list[tuple[int, bool, bool]] = []


_tls = _TLS()


def frame() -> Frame:
    """The frame in force in this thread."""
    frames = _tls.frames
    return frames[-1] if frames else _EMPTY


def path() -> str:
    """The path of the innermost registered module running its forward ('' outside any)."""
    paths = _tls.paths
    return paths[-1] if paths else ""


class KinkMode(TorchFunctionMode):
    """Reroutes the kink ops (see :data:`kinkprop.torch.ops.HANDLERS`); the rest pass through."""

    def __init__(self, handlers: dict):
        super().__init__()
        self.handlers = handlers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = self.handlers.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(func, args, kwargs or {})


def push(new: Frame) -> None:
    if not _tls.frames:
        from .ops import HANDLERS

        mode = KinkMode(HANDLERS)
        mode.__enter__()
        _tls.mode = mode
    _tls.frames.append(new)


def pop() -> None:
    _tls.frames.pop()
    if not _tls.frames and _tls.mode is not None:
        mode, _tls.mode = _tls.mode, None
        mode.__exit__(None, None, None)


class scoped:
    """Context manager pushing ``frame().replace(**changes)`` for its duration."""

    def __init__(self, **changes):
        self.changes = changes

    def __enter__(self):
        push(replace(frame(), **self.changes))
        return self

    def __exit__(self, *exc):
        pop()
        return False


# -- registered modules: paths and patches -----------------------------------------------------


@dataclass
class _Info:
    names: list[str] = field(default_factory=list)  # the latest registration names it
    patches: list[Any] = field(default_factory=list)  # objects with .frame_for(outer) -> Frame


_registry: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hooks: list = []
_users = 0


def _pre_hook(module, args):
    info = _registry.get(module)
    if info is None:
        _tls.hook_stack.append((id(module), False, False))
        return
    pushed_path = bool(info.names)
    if pushed_path:
        _tls.paths.append(info.names[-1])
    pushed_frame = bool(info.patches)
    if pushed_frame:
        push(info.patches[-1].frame_for(frame()))
    _tls.hook_stack.append((id(module), pushed_path, pushed_frame))


def _post_hook(module, args, output):
    stack = _tls.hook_stack
    if not stack or stack[-1][0] != id(module):  # hooks installed while this forward ran
        return None
    key, pushed_path, pushed_frame = stack.pop()
    if pushed_frame:
        pop()
    if pushed_path:
        _tls.paths.pop()
    return None


def _acquire():
    global _users
    if _users == 0:
        _hooks.append(_module.register_module_forward_pre_hook(_pre_hook))
        _hooks.append(_module.register_module_forward_hook(_post_hook, always_call=True))
    _users += 1


def _release():
    global _users
    _users -= 1
    if _users == 0:
        while _hooks:
            _hooks.pop().remove()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (names then match a
    single-process run)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                             torch.nn.DataParallel)):
        model = model.module
    return model


class Registration:
    """Names (and optionally patches) the modules of a model until :meth:`remove`."""

    def __init__(self, model: torch.nn.Module, patch=None, only=None, prefix: str = ""):
        model = unwrap(model)
        self.entries = []
        for name, module in model.named_modules(prefix=prefix):
            info = _registry.get(module)
            if info is None:
                info = _registry[module] = _Info()
            info.names.append(name)
            applies = patch is not None and (only is None or only(name, module))
            if applies:
                info.patches.append(patch)
            self.entries.append((weakref.ref(module), name, patch if applies else None))
        _acquire()
        self.active = True

    def remove(self):
        if not self.active:
            return
        self.active = False
        for ref, name, patch in self.entries:
            module = ref()
            info = None if module is None else _registry.get(module)
            if info is None:
                continue
            _remove_last(info.names, name)
            if patch is not None:
                _remove_last(info.patches, patch)
            if not info.names and not info.patches:
                del _registry[module]
        _release()


def _remove_last(items: list, item) -> None:
    for i in range(len(items) - 1, -1, -1):
        if items[i] is item or items[i] == item:
            del items[i]
            return
