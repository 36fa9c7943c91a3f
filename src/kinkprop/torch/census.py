"""Census on the device: how often a forward pass lands exactly on a kink, per site.

    with kinkprop.torch.census(model) as c:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            c.step()
        print(c.read())

Counts stay on the data's device: each kink op adds ``torch.count_nonzero`` results into a device
tensor (no ``.item()``, no host sync per op); :meth:`Census.read` moves them to the host once
(summed over ranks with ``all_reduce`` when ``torch.distributed`` is initialized; every rank must
call it). What is counted, per call of a kink op:

=========================================  ===========================  ====================
primitive                                  evaluated                    hits
=========================================  ===========================  ====================
relu, leaky_relu, abs, l1_loss             elements                     ``+0`` and ``-0``
                                                                        inputs, separately
relu6, hardtanh, clamp                     elements (broadcast)         ``low`` / ``high``:
                                                                        inputs equal a bound
maximum, minimum                           elements (broadcast)         ``ties``: a = b
max, min, max_axis, min_axis, max_pool2d   groups / windows             ``tied``: groups whose
                                                                        max is not unique
=========================================  ===========================  ====================

Sites: inside a module of a named model (``census(model)`` or ``patch(model, ...)``) a site is
``"<module path>:<primitive>"`` (``#k`` added when the module applies it again in the same step),
else ``"<primitive>#k"`` for the k-th application in the step. Call :meth:`Census.step` at the end
of each step (with a model given, each forward of the model also restarts the numbering).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..textable import text_table
from . import _scope

_FIELDS = {
    "relu": ("+0", "-0"), "leaky_relu": ("+0", "-0"), "abs": ("+0", "-0"),
    "l1_loss": ("+0", "-0"),
    "relu6": ("low", "high"), "hardtanh": ("low", "high"), "clamp": ("low", "high"),
    "maximum": ("ties",), "minimum": ("ties",),
    "max": ("tied",), "min": ("tied",), "max_axis": ("tied",), "min_axis": ("tied",),
    "max_pool2d": ("tied",),
}


@dataclass
class SiteCount:
    """One site's totals: ``calls``, ``evaluated`` (see the module table), ``hits`` and the
    ``detail`` they split into (``+0`` / ``-0``, ``low`` / ``high``, ``ties`` or ``tied``)."""

    primitive: str
    calls: int
    evaluated: int
    hits: int
    detail: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.hits / self.evaluated if self.evaluated else 0.0


@dataclass
class CensusReading:
    """What :meth:`Census.read` returns: ``sites`` in first-seen order, ``steps`` counted on this
    rank, ``world_size`` ranks summed."""

    sites: dict
    steps: int
    world_size: int = 1

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.sites.values())

    @property
    def evaluated(self) -> int:
        return sum(s.evaluated for s in self.sites.values())

    def by_primitive(self) -> dict:
        out: dict = {}
        for s in self.sites.values():
            o = out.setdefault(s.primitive, {"calls": 0, "evaluated": 0, "hits": 0})
            o["calls"] += s.calls
            o["evaluated"] += s.evaluated
            o["hits"] += s.hits
        return out

    def __str__(self) -> str:
        rows = [("site", "primitive", "calls", "evaluated", "hits", "detail")]
        for name, s in self.sites.items():
            detail = ", ".join(f"{k} {v}" for k, v in s.detail.items())
            rows.append((name, s.primitive, str(s.calls), str(s.evaluated), str(s.hits), detail))
        lines = [text_table(rows[0], rows[1:], align="left")]
        lines.append(f"{self.hits} kink hit(s) in {self.evaluated} evaluated, {self.steps} "
                     f"step(s), {self.world_size} rank(s)")
        return "\n".join(lines)


class _Site:
    __slots__ = ("primitive", "counts", "calls", "evaluated")

    def __init__(self, primitive, counts, evaluated):
        self.primitive, self.counts, self.calls, self.evaluated = primitive, counts, 1, evaluated


class Census:
    """Accumulates kink hits per site in device tensors (see the module doc)."""

    def __init__(self, all_reduce: bool = True):
        self.all_reduce = all_reduce
        self._sites: dict[str, _Site] = {}
        self._seen: dict[str, int] = {}
        self.steps = 0

    # called by the ops ------------------------------------------------------------------------
    def add(self, primitive: str, counts: torch.Tensor, evaluated: int) -> None:
        path = _scope.path()
        base = f"{path}:{primitive}" if path else primitive
        k = self._seen.get(base, 0)
        self._seen[base] = k + 1
        name = base if path and not k else f"{base}#{k}"
        site = self._sites.get(name)
        if site is None:
            self._sites[name] = _Site(primitive, counts, evaluated)
        else:
            site.counts = site.counts + counts  # out of place: counts may alias a caller's
            site.calls += 1
            site.evaluated += evaluated

    # public -------------------------------------------------------------------------------------
    def step(self) -> None:
        """End of a step: restart the call-order numbering of sites; no device sync."""
        self._seen.clear()
        self.steps += 1

    def new_pass(self) -> None:
        """A new forward pass of the named model: restart the call-order numbering."""
        self._seen.clear()

    def reset(self) -> None:
        self._sites.clear()
        self._seen.clear()
        self.steps = 0

    def read(self) -> CensusReading:
        """The totals since the start (or :meth:`reset`), moved to the host in one transfer;
        summed over ranks when torch.distributed is initialized (a collective: call it on every
        rank)."""
        names = [(n, s.primitive) for n, s in self._sites.items()]
        world = 1
        dist = torch.distributed
        distributed = (self.all_reduce and dist.is_available() and dist.is_initialized()
                       and dist.get_world_size() > 1)
        if distributed:
            world = dist.get_world_size()
            gathered = [None] * world
            dist.all_gather_object(gathered, names)
            names = list(dict.fromkeys(item for part in gathered for item in map(tuple, part)))
        if distributed:
            device = self._device(distributed)
            rows = []
            for name, prim in names:
                site = self._sites.get(name)
                if site is None:
                    rows.append(torch.zeros(4, dtype=torch.int64, device=device))
                    continue
                head = torch.tensor([site.calls, site.evaluated], dtype=torch.int64)
                rows.append(torch.cat([head.to(device, non_blocking=True),
                                       _pad2(site.counts).to(device)]))
            table = torch.stack(rows) if rows else torch.zeros((0, 4), dtype=torch.int64,
                                                               device=device)
            dist.all_reduce(table)
            values = table.cpu().tolist()
        else:  # one stack and one transfer; calls and evaluated are host numbers already
            sites = [self._sites[name] for name, _ in names]
            counts = torch.stack([_pad2(s.counts) for s in sites]).cpu().tolist() if sites else []
            values = [(s.calls, s.evaluated, *c) for s, c in zip(sites, counts)]
        sites = {}
        for (name, prim), (calls, evaluated, c0, c1) in zip(names, values):
            fields = _FIELDS.get(prim, ("hits",))
            if fields == ("+0", "-0"):  # stored as nonzero counts of the values and their bits
                c0, c1 = evaluated - c1, c1 - c0
            detail = dict(zip(fields, (c0, c1)))
            sites[name] = SiteCount(prim, calls, evaluated, sum(detail.values()), detail)
        return CensusReading(sites, self.steps, world)

    def _device(self, distributed: bool):
        for site in self._sites.values():
            return site.counts.device
        if distributed and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _pad2(counts: torch.Tensor) -> torch.Tensor:
    if counts.shape == (2,):
        return counts
    counts = counts.reshape(-1)
    return torch.cat([counts, counts.new_zeros(2 - counts.numel())])
