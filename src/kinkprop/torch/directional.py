"""The directional policy in torch: kinks resolved along a direction with forward-mode AD.

Method (Kakade & Lee 2018; the NumPy engine's :mod:`kinkprop.kinks.directional`). One forward
pass carries a tangent ``d`` on the parameters (``torch.autograd.forward_ad`` dual tensors swapped
in for the model's parameters during its forward). Every kink op under ``"directional"`` reads its
input's tangent and selects the piece active on ``theta + t d`` as ``t -> 0+``: the side the
tangent points to at an elementwise kink, the largest tangent among tied inputs (maximum, max
reductions, max-pool windows); the selected piece's derivative then serves both the tangent it
passes on (so later sites see the choices made upstream) and the ordinary backward. The gradient
is ``lim_{t -> 0+} grad f(theta + t d)``, an element of the Bouligand (hence Clarke)
subdifferential, exactly as in the NumPy engine.

Differences from the NumPy engine, by design:

- one pass instead of two: the tangent rides along the forward, which therefore costs a forward-
  mode evaluation on every step (the NumPy engine sweeps only on steps that hit a kink);
- one direction, no lexicographic refinement: kink elements whose tangent is exactly 0 stay
  tied; they take the ``fallback`` preset's value at an elementwise kink and an equal split among
  the inputs still tied (as the NumPy engine does after its last direction). Along a *random*
  direction such a tie joins pieces that agree to first order, which with probability 1 means
  their gradients agree, so no choice changes the result: :meth:`Directional.report` counts them
  as ``immaterial`` (the NumPy engine's default too). Along a *given* direction they are
  ``unresolved`` and the report warns (:class:`UnresolvedKinkWarning`);
- the report is read on demand (one host sync), never per op. (On a CPU, where reading a count
  costs no sync, max-pool sites find their rare tied windows by index instead of comparing
  tangents over every window, and relu sites without a kink skip the tangent; elsewhere they run
  branch-free.)

Directions are drawn fresh at each forward of the model from generators seeded with ``seed`` (one
per device: NumPy's SFC64 on the CPU, ``torch.Generator`` elsewhere), so every rank of a
data-parallel run draws the same direction: independent uniform draws on [-1, 1] built from the
generator's raw bits, as many as the parameter's dtype holds (:func:`uniform_bits`; any
continuous distribution serves).

Cost: the tangent of a convolution takes two more convolutions (``conv(x_t, w) + conv(x, w_t)``),
the most of it on a CPU; batch-norm's tangent is two native kernels (its batch-norm backward
kernel applied to the tangent, and batch-norm with the tangents for weight and bias), cheaper
than torch's own forward-mode formula; each step draws one number per parameter (negligible on a
GPU; on one CPU core about 10 ms for ResNet-18's 11M parameters in bfloat16, 17 ms in float32). A
direction on the 1-D parameters (``params=``) skips the draw and one of the two convolutions. The
dual level closes when backward starts: torch's backward runs several times slower while dual
tensors of an open level are alive.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from ..kinks.directional import Report, SiteReport, UnresolvedKinkWarning
from ..kinks.policy import Policy
from ..kinks.presets import PRESETS
from . import _scope

__all__ = ["Directional", "UnresolvedKinkWarning"]


def _select(named, params):
    if callable(params):
        return [(n, p) for n, p in named if params(n, p)]
    items = list(params)
    names = {i for i in items if isinstance(i, str)}
    ids = {id(i) for i in items if isinstance(i, torch.Tensor)}
    known = {n for n, _ in named}
    if names - known:
        raise ValueError(f"no parameter named {sorted(names - known)} (or it needs no grad)")
    return [(n, p) for n, p in named if n in names or id(p) in ids]


_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def uniform_bits(shape, dtype, generator, device=None, out=None, words=None) -> torch.Tensor:
    """Independent draws, uniform on [-1, 1]: ``k / 2^(b-1)`` for uniformly random b-bit
    integers k, b the width of ``dtype`` (16, 32 or 64 bits), rounded to ``dtype``. Any continuous
    distribution serves the directional policy (a tie stays material only on a set of directions
    of measure zero); this one spends raw 64-bit words from ``generator`` and exactly the bits
    that ``dtype`` can hold (a 16-bit direction takes a quarter of a word). ``generator``: a
    ``torch.Generator``, or for the CPU a NumPy bit generator (``numpy.random.SFC64``, whose raw
    words come about 3x faster than a CPU ``torch.Generator``'s). ``out`` and ``words`` (int64,
    ``ceil(numel * width / 8)``) are buffers to reuse."""
    n = math.prod(shape)
    width = dtype.itemsize
    m = -(-n * width // 8)
    if isinstance(generator, torch.Generator):
        if words is None:
            words = torch.empty(m, dtype=torch.int64, device=device)
        words.random_(-2**63, None, generator=generator)  # every bit random
    else:
        words = torch.from_numpy(generator.random_raw(m).view(np.int64))
    k = words.view(_INT_OF_WIDTH[width])[:n].view(shape)
    out = k.to(dtype) if out is None else out.copy_(k)
    return out.mul_(2.0 ** (1 - 8 * width))


class Directional:
    """Supplies tangents for the directional policy: a direction per forward, on ``params``.

    ``model``: the root module whose parameters carry the direction during its forward (the
    inner module of a DDP wrapper); ``params``: which of them (``None``: every parameter that
    requires grad; else names, tensors, or a predicate ``f(name, param)``), or without a model
    explicit leaf tensors (for :func:`kinkprop.torch.directional_grad`).

    A direction on a subset (e.g. ``params=lambda n, p: n.endswith("bias")``) costs less: no
    random draw and no tangent through the other weights. The result is still
    ``lim grad f(theta + t d)``, a Bouligand element, at every step whose report shows no
    unresolved kink (each kink input must move along ``d``, as it does when each unit has its own
    bias); kinks it leaves tied are reported. ``directions``: a list holding one direction (a
    dict keyed by parameter or parameter name, or a list of tensors in ``params`` order) used at
    every step instead of random draws. ``fallback``: the preset unresolved elementwise kinks
    take.
    """

    def __init__(self, model=None, params=None, seed: int = 0, directions=None,
                 fallback: str = "pytorch", per_forward_level: bool = False):
        if fallback not in PRESETS:
            raise ValueError(f"fallback must name a preset ({', '.join(PRESETS)}), got "
                             f"{fallback!r}")
        self.root = None if model is None else _scope.unwrap(model)
        if self.root is not None:
            named = [(n, p) for n, p in self.root.named_parameters() if p.requires_grad]
            if params is not None:
                named = _select(named, params)
        elif params is not None:
            named = [(str(i), p) for i, p in enumerate(params)]
        else:
            raise ValueError("Directional needs a model or params")
        seen, self.params, self.names = set(), [], []
        for name, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
                self.names.append(name)
        self.seed = seed
        self.fallback = Policy.from_preset(fallback)
        self.given = None if directions is None else self._convert(directions)
        self.per_forward_level = per_forward_level
        self._gens: dict = {}
        self._buffers: list | None = None
        self._swapped: list = []
        self._own_level = False
        self._hooks: list = []
        self._seen: dict = {}
        self.records: list = []
        self.current: list | None = None
        self.duals: list = []
        self.steps = 0

    # -- directions ------------------------------------------------------------------------------
    def _convert(self, directions):
        if isinstance(directions, (list, tuple)) and directions and all(
                isinstance(d, (dict, list, tuple)) for d in directions):
            if len(directions) > 1:
                raise ValueError("kinkprop.torch resolves along one direction (no lexicographic "
                                 "refinement); give a list with one direction")
            directions = directions[0]
        if isinstance(directions, dict):
            by_key = {}
            for k, v in directions.items():
                by_key[k if isinstance(k, str) else id(k)] = v
            d = []
            for name, p in zip(self.names, self.params):
                v = by_key.pop(name, None)
                v = by_key.pop(id(p), v)
                d.append(torch.zeros_like(p) if v is None else v)
            if by_key:
                raise ValueError("a direction names a tensor that is not a differentiated input")
        else:
            d = list(directions) if isinstance(directions, (list, tuple)) else [directions]
        if len(d) != len(self.params):
            raise ValueError(f"a direction needs one tensor per parameter ({len(self.params)}), "
                             f"got {len(d)}")
        out = []
        for t, p in zip(d, self.params):
            t = torch.as_tensor(t)
            if t.numel() != p.numel():
                raise ValueError(f"a direction's tensor has shape {tuple(t.shape)}, its "
                                 f"parameter {tuple(p.shape)}")
            out.append(t.reshape(p.shape).to(device=p.device, dtype=p.dtype))
        return out

    def _generator(self, device):
        """The direction's source on ``device``, seeded with ``seed``: a NumPy SFC64 bit
        generator on the CPU (see :func:`uniform_bits`), a ``torch.Generator`` elsewhere."""
        g = self._gens.get(device)
        if g is None:
            if torch.device(device).type == "cpu":
                g = np.random.SFC64(self.seed % 2**128)
            else:
                g = torch.Generator(device=device)
                g.manual_seed(self.seed)
            self._gens[device] = g
        return g

    def draw(self) -> list:
        """The next direction: the given one, or a fresh uniform draw per parameter element (see
        :func:`uniform_bits`), into the same tensors at every draw (no fresh memory to fault in
        each step: clone :attr:`current` to keep one)."""
        if self.given is not None:
            return self.given
        if self._buffers is None or any(
                b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
                for p, (b, _) in zip(self.params, self._buffers)):  # (first draw, or model.to)
            self._buffers = [
                (torch.empty_like(p, memory_format=torch.contiguous_format),
                 None if p.device.type == "cpu" else torch.empty(
                     -(-p.numel() * p.dtype.itemsize // 8), dtype=torch.int64, device=p.device))
                for p in self.params]
        return [uniform_bits(p.shape, p.dtype, self._generator(p.device), p.device, out, words)
                for p, (out, words) in zip(self.params, self._buffers)]

    # -- the forward -----------------------------------------------------------------------------
    def open_level(self):
        if fwAD._current_level < 0:
            fwAD.enter_dual_level()
            self._own_level = True

    def close_level(self):
        if self._own_level:
            self._own_level = False
            fwAD.exit_dual_level()

    def before_backward(self):
        """Backward is starting: close the dual level this driver opened (see
        :func:`kinkprop.torch.ops._backward_handler`); the next forward opens a new one."""
        if not self._swapped:  # not inside the model's forward
            self.close_level()

    def begin(self):
        """A new forward: draw a direction and swap dual parameters in (not under no_grad:
        no gradient, nothing to resolve)."""
        self._seen.clear()
        self.records = []
        if not torch.is_grad_enabled() and self.root is not None:
            return
        self.open_level()
        self.steps += 1
        with torch.no_grad():
            self.current = self.draw()
        self.duals = [fwAD.make_dual(p, t) for p, t in zip(self.params, self.current)]
        if self.root is None:
            return
        by_id = {id(p): d for p, d in zip(self.params, self.duals)}
        for module in self.root.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in by_id:
                    module._parameters[name] = by_id[id(p)]
                    self._swapped.append((module, name, p))

    def end(self):
        """End of the model's forward: put the parameters back."""
        while self._swapped:
            module, name, p = self._swapped.pop()
            module._parameters[name] = p
        self.duals = []
        if self.per_forward_level:
            self.close_level()

    def attach(self):
        if self.root is None or self._hooks:
            return
        self._hooks.append(self.root.register_forward_pre_hook(lambda m, a: self.begin()))
        self._hooks.append(self.root.register_forward_hook(lambda m, a, o: self.end(),
                                                           always_call=True))

    def detach(self):
        while self._hooks:
            self._hooks.pop().remove()
        self.end()

    # -- the report ------------------------------------------------------------------------------
    def record(self, primitive, hits, unresolved):
        path = _scope.path()
        base = f"{path}:{primitive}" if path else primitive
        k = self._seen.get(base, 0)
        self._seen[base] = k + 1
        name = base if path and not k else f"{base}#{k}"
        self.records.append((name, primitive, hits, unresolved))

    def report(self, warn: bool = True) -> Report:
        """What the latest forward resolved (one host sync); warns when elements stayed tied."""
        report = Report(sites=len(self.records), explicit=self.given is not None)
        if not self.records:
            return report
        counts = torch.stack([torch.stack([h.reshape(()), u.reshape(()).to(h.device)])
                              for _, _, h, u in self.records]).cpu().tolist()
        for (name, prim, _, _), (hits, unresolved) in zip(self.records, counts):
            if hits:
                report.details.append(SiteReport(name, prim, hits, [hits - unresolved],
                                                 unresolved))
                if unresolved:
                    report.unresolved_sites.append((name, unresolved))
        report.sites_hit = len(report.details)
        report.kinks = sum(s.kinks for s in report.details)
        report.unresolved = sum(s.unresolved for s in report.details)
        if report.unresolved and self.given is None:
            # tied along a random direction: the tied pieces agree to first order along d, so
            # with probability 1 their gradients are equal and no choice changes the result
            # (reported as immaterial, as the NumPy engine does)
            report.immaterial, report.unresolved = report.unresolved, 0
            report.unresolved_sites = []
            for site in report.details:
                site.immaterial, site.unresolved = site.unresolved, 0
        report.resolved = report.kinks - report.unresolved
        report.swept = report.kinks > 0
        report.directions = 1 if report.swept else 0
        report.by_direction = [report.resolved] if report.swept else []
        if warn and report.unresolved:
            sites = ", ".join(dict.fromkeys(n for n, _ in report.unresolved_sites))
            warnings.warn(
                f"directional policy: kink elements still tied along the given direction at "
                f"{sites} (counts in the report); elementwise kinks there take the "
                f"{self.fallback.label!r} preset's value and ties split equally",
                UnresolvedKinkWarning, stacklevel=2)
        return report
