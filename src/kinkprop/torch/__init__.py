"""kinkprop for PyTorch models: the registry's kink policies, a census and the directional policy.

    import kinkprop.torch as kpt

    with kpt.kink_policy("jax", relu=1.0):          # any nn.Module, any functional call
        loss = F.cross_entropy(model(x), y)
        loss.backward()

    handle = kpt.patch(model, "tensorflow", modules=["layer4"])   # only some layers
    with kpt.census(model) as c:                    # kink hits per site, counted on the device
        ...; c.step()
    print(c.read())
    with kpt.kink_policy("directional", model=model, seed=0) as scope:   # a Clarke subgradient
        ...; scope.report()

Conventions (the same as the NumPy engine, from the same registry, :mod:`kinkprop.kinks`):

- the value chosen at a kink *multiplies* the incoming gradient; presets ``pytorch`` (2.13),
  ``pytorch-2.14``, ``jax`` and ``tensorflow`` reproduce those frameworks (``kinkprop
  conventions`` prints the table) and keyword overrides take numbers, ``"left"`` / ``"right"``,
  pairs ``(at_low, at_high)`` or tie rules ``"split"`` / ``"first"`` / ``"last"``;
- the policy in force when an op runs forward decides its backward (it is captured then);
- outside every scope torch runs untouched; inside, the kink ops listed in
  :mod:`kinkprop.torch.ops` are rerouted by a ``TorchFunctionMode`` (modules such as nn.ReLU,
  nn.MaxPool2d, nn.ReLU6 reach them through the functional API), every other call passes through.

- the directional policy (:mod:`kinkprop.torch.directional`) resolves each kink along one random
  direction carried by forward-mode AD in the same forward pass: ``lim_{t->0+} grad f(theta +
  t d)``, as the NumPy engine computes it;
- under DistributedDataParallel, pass the model (wrapped or not) as usual: ``Census.read`` sums
  the counts over ranks (a collective: call it on every rank) and every rank draws the same
  direction from the same ``seed``.

Not covered: ``torch.compile`` / TorchScript (the mode is Python-level), ``max_pool1d/3d`` and
adaptive max-pooling, hardswish and other kinked ops without a registry entry, lexicographic
refinement with several directions.

This package imports torch; ``import kinkprop`` never imports it.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.autograd.forward_ad as fwAD

from ..kinks.policy import Policy, make_policy
from . import _scope
from .census import Census, CensusReading, SiteCount
from .directional import Directional, UnresolvedKinkWarning

__all__ = ["kink_policy", "patch", "census", "directional_grad", "Scope", "Patch", "Census",
           "CensusReading", "SiteCount", "Directional", "UnresolvedKinkWarning", "name_modules"]


class Scope:
    """What :func:`kink_policy` yields: the ``policy`` and, for the directional policy with a
    model, the ``directional`` driver (its :meth:`report` covers the latest forward)."""

    def __init__(self, policy: Policy, directional: Directional | None):
        self.policy = policy
        self.directional = directional

    def report(self, warn: bool = True):
        if self.directional is None:
            raise RuntimeError("no directional resolution in this scope")
        return self.directional.report(warn=warn)


@contextlib.contextmanager
def kink_policy(preset: str | Policy | None = None, *, model: torch.nn.Module | None = None,
                params=None, seed: int = 0, directions=None, fallback: str = "pytorch",
                **overrides):
    """Scope in which torch's kink ops follow ``preset`` with ``overrides`` (``None``: the
    kinkprop policy in force, by default ``"pytorch"``), e.g. ``kink_policy("jax", relu=1.0)``.

    With ``"directional"`` anywhere in the policy, ``model`` names the module whose parameters
    carry the direction (each forward of it draws one from a generator seeded by ``seed``, or
    uses ``directions``), ``params`` optionally a subset of them; ``fallback`` is the preset for
    kink elements left unresolved. See :mod:`kinkprop.torch.directional`.
    """
    policy = make_policy(preset, **overrides)
    driver = None
    if policy.uses_directional:
        if model is not None:
            driver = Directional(model, params, seed=seed, directions=directions,
                                 fallback=fallback)
    elif model is not None or directions is not None or params is not None:
        raise TypeError("model=, params= and directions= only apply to a policy using "
                        "'directional'")
    if driver is not None:
        driver.attach()
    frame = replace(_scope.frame(), policy=policy,
                    directional=driver if driver is not None else _scope.frame().directional)
    _scope.push(frame)
    try:
        yield Scope(policy, driver)
    finally:
        _scope.pop()
        if driver is not None:
            driver.detach()
            driver.close_level()


_UNSET = object()


class Patch:
    """A policy applied to some modules of a model during their forward (see :func:`patch`).
    ``remove()`` undoes it."""

    def __init__(self, model, preset, overrides, only, params, seed, directions, fallback):
        self._preset, self._overrides = preset, overrides
        self._fixed = None if preset is None else make_policy(preset, **overrides)
        probe = self._fixed if self._fixed is not None else make_policy(None, **overrides)
        self.directional = None
        if probe.uses_directional:
            self.directional = Directional(model, params, seed=seed, directions=directions,
                                           fallback=fallback, per_forward_level=True)
        self._cache: tuple = (_UNSET, None)
        self._registration = _scope.Registration(model, patch=self, only=only)
        if self.directional is not None:
            self.directional.attach()

    def policy_for(self, outer: Policy | None) -> Policy:
        if self._fixed is not None:
            return self._fixed
        if self._cache[0] is not outer:  # overrides on top of the policy in force
            base = outer if outer is not None else make_policy(None)
            self._cache = (outer, base.with_overrides(**self._overrides))
        return self._cache[1]

    def frame_for(self, outer: _scope.Frame) -> _scope.Frame:
        return _scope.Frame(self.policy_for(outer.policy), outer.census,
                            self.directional if self.directional is not None
                            else outer.directional)

    def report(self, warn: bool = True):
        if self.directional is None:
            raise RuntimeError("this patch does not use the directional policy")
        return self.directional.report(warn=warn)

    def remove(self):
        self._registration.remove()
        if self.directional is not None:
            self.directional.detach()


def patch(model: torch.nn.Module, preset: str | Policy | None = None, *, modules=None,
          params=None, seed: int = 0, directions=None, fallback: str = "pytorch",
          **overrides) -> Patch:
    """Apply a policy to ``model`` (or only to some of its submodules) whenever it runs.

    ``modules``: ``None`` (the whole model), or submodule names (as ``named_modules`` gives
    them), module types, module objects, or a predicate ``f(name, module)``. With ``preset=None``
    the overrides apply on top of the policy in force at forward time. Sites inside the model
    are named by module path in a census. The policy holds during each selected module's
    forward (the innermost scope wins); the returned :class:`Patch` undoes it with ``remove()``.
    With ``"directional"``, each forward of ``model`` carries a direction (see
    :func:`kink_policy`).
    """
    root = _scope.unwrap(model)
    return Patch(root, preset, overrides, _selector(root, modules), params, seed, directions,
                 fallback)


def _selector(root, modules):
    if modules is None:
        return lambda name, module: module is root
    if callable(modules) and not isinstance(modules, type):
        return modules
    items = [modules] if isinstance(modules, (str, type, torch.nn.Module)) else list(modules)
    names = {m for m in items if isinstance(m, str)}
    types = tuple(m for m in items if isinstance(m, type))
    objs = {id(m) for m in items if isinstance(m, torch.nn.Module)}
    known = {n for n, _ in root.named_modules()}
    missing = names - known
    if missing:
        raise ValueError(f"patch: no submodule named {sorted(missing)}")
    return lambda name, module: (name in names or id(module) in objs
                                 or (bool(types) and isinstance(module, types)))


@contextlib.contextmanager
def census(model: torch.nn.Module | None = None, all_reduce: bool = True):
    """Count kink hits per site on the device while the scope is open (see
    :mod:`kinkprop.torch.census`); ``model`` names sites by module path. Gradients are unchanged
    (torch's own rules unless a policy is in force)."""
    c = Census(all_reduce=all_reduce)
    registration = hook = None
    if model is not None:
        root = _scope.unwrap(model)
        registration = _scope.Registration(root)
        hook = root.register_forward_pre_hook(lambda m, a: c.new_pass())
    _scope.push(replace(_scope.frame(), census=c))
    try:
        yield c
    finally:
        _scope.pop()
        if registration is not None:
            registration.remove()
            hook.remove()


@contextlib.contextmanager
def name_modules(model: torch.nn.Module, prefix: str = ""):
    """Name the sites inside ``model`` by module path while the scope is open."""
    registration = _scope.Registration(model, prefix=prefix)
    try:
        yield
    finally:
        registration.remove()


def directional_grad(f, params, *, seed: int = 0, directions=None, fallback: str = "pytorch",
                     preset: str | Policy = "directional", **overrides):
    """Gradient of the scalar ``f(*params)`` under the directional policy along one direction
    on ``params`` (random from ``seed``, or ``directions``). Returns ``(grads, report)``.

    ``f`` receives dual tensors standing for ``params``; kinks on the way are resolved as in
    :mod:`kinkprop.torch.directional`.
    """
    params = list(params)
    driver = Directional(params=params, seed=seed, directions=directions, fallback=fallback)
    policy = make_policy(preset, **overrides)
    driver.open_level()
    try:
        driver.begin()
        with _scope.scoped(policy=policy, directional=driver):
            out = f(*driver.duals)
        out = fwAD.unpack_dual(out).primal
    finally:
        driver.end()
        driver.close_level()
    grads = torch.autograd.grad(out, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return grads, driver.report()
