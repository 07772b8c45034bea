"""The structural causal model: a validated DAG of scalar variables plus the image, and the DSCM.

``SCM`` is the graph alone (names, parents, topological order, descendants, intervention checks).
``DSCM`` attaches mechanisms to it: one invertible attribute mechanism per scalar variable and one
image mechanism, and computes counterfactuals by abduction, action and prediction. The DSCM's
surface speaks data units (mm^2); networks see values normalised by the saved ``VariableTransform``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from causalimg.core.mechanism import AttributeMechanism, Exogenous, ImageMechanism
from causalimg.core.transform import VariableTransform
from causalimg.errors import ConfigError, InterventionError

IMAGE = "image"

Intervention = Mapping[str, "float | torch.Tensor"]


class SCM:
    """A DAG over named scalar variables, and the image node whose parents are given separately.

    graph: variable -> its parents (every variable is a key; roots map to ``()``).
    image_parents: the variables the image's mechanism sees; ``None`` means all, in graph order.
    """

    def __init__(self, graph: Mapping[str, Sequence[str]], image_parents: Sequence[str] | None = None):
        if IMAGE in graph:
            raise ConfigError(
                f"graph: {IMAGE!r} is the image node; give its parents as image_parents, not as a variable"
            )
        for child, parents in graph.items():
            if isinstance(parents, str):
                raise ConfigError(f"graph: parents of {child!r} must be a list of names, got the string {parents!r}")
            for p in parents:
                if p == IMAGE:
                    raise ConfigError(f"graph: {child!r} lists the image as a parent; the image is a sink")
                if p not in graph:
                    raise ConfigError(f"graph: parent {p!r} of {child!r} is not a variable; known: {', '.join(graph)}")
            if len(set(parents)) != len(parents):
                raise ConfigError(f"graph: parents of {child!r} repeat a name: {list(parents)}")
        self.parents: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in graph.items()}
        self.order: tuple[str, ...] = _topological_order(self.parents)
        names = tuple(graph) if image_parents is None else tuple(image_parents)
        for p in names:
            if p not in self.parents:
                raise ConfigError(f"image_parents: {p!r} is not a variable; known: {', '.join(self.parents)}")
        self.image_parents: tuple[str, ...] = names

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(self.parents)

    def descendants(self, names: Sequence[str]) -> set[str]:
        """Strict descendants of ``names`` among the scalar variables (the image is always one)."""
        children: dict[str, list[str]] = {k: [] for k in self.parents}
        for child, parents in self.parents.items():
            for p in parents:
                children[p].append(child)
        seen: set[str] = set()
        stack = [c for n in names for c in children[n]]
        while stack:
            v = stack.pop()
            if v not in seen:
                seen.add(v)
                stack.extend(children[v])
        return seen

    def check_names(self, do: Mapping[str, object]) -> None:
        """Raise ``InterventionError`` for an intervention on the image or on an unknown name."""
        if not do:
            raise InterventionError("empty intervention: name at least one variable in do(...)")
        for name in do:
            if name == IMAGE:
                raise InterventionError(f"cannot intervene on {IMAGE!r}: only scalar variables have do(...)")
            if name not in self.parents:
                raise InterventionError(f"unknown variable {name!r} in do(...); known: {', '.join(self.parents)}")


def _topological_order(parents: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Kahn's algorithm, ties broken by declaration order; a cycle is a ``ConfigError`` naming it."""
    remaining = dict(parents)
    order: list[str] = []
    while remaining:
        ready = [v for v, ps in remaining.items() if all(p not in remaining for p in ps)]
        if not ready:
            raise ConfigError(f"graph has a cycle: {' -> '.join(_find_cycle(remaining))}")
        for v in ready:
            order.append(v)
            del remaining[v]
    return tuple(order)


def _find_cycle(parents: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Walk parent links inside a cycle-only remainder until a name repeats."""
    path = [next(iter(parents))]
    while True:
        nxt = next(p for p in parents[path[-1]] if p in parents)
        if nxt in path:
            cycle = [*path[path.index(nxt) :], nxt]
            return cycle[::-1]  # parent -> child direction
        path.append(nxt)


class AttributeModel(nn.Module):
    """The scalar part of a deep SCM: one invertible attribute mechanism per variable over ``scm``.

    Parent tensors ``pa`` are (B, P) in data units with columns in ``transform.names`` order; the
    mechanisms see them normalised by ``transform``. ``DSCM`` adds the image.
    """

    def __init__(self, scm: SCM, attribute_mechanisms: Mapping[str, nn.Module], transform: VariableTransform):
        super().__init__()
        if set(scm.variables) != set(transform.names):
            raise ConfigError(
                f"SCM variables {sorted(scm.variables)} differ from the transform's {sorted(transform.names)}"
            )
        missing = [v for v in scm.variables if v not in attribute_mechanisms]
        extra = [v for v in attribute_mechanisms if v not in scm.parents]
        if missing or extra:
            raise ConfigError(f"attribute mechanisms: missing for {missing}, unknown variables {extra}")
        for name, mech in attribute_mechanisms.items():
            if not isinstance(mech, AttributeMechanism):
                raise ConfigError(f"attribute mechanism of {name!r} lacks forward_map/inverse_map/log_prob")
        self.scm = scm
        self.transform = transform
        self.attributes = nn.ModuleDict({v: attribute_mechanisms[v] for v in scm.order})
        self._col = {n: i for i, n in enumerate(transform.names)}

    # -- helpers -------------------------------------------------------------------------------
    def mechanism(self, name: str) -> AttributeMechanism:
        return self.attributes[name]  # type: ignore[return-value]  # checked in __init__

    def mechanisms(self) -> list[tuple[str, AttributeMechanism]]:
        """(variable, its mechanism) in topological order."""
        return [(name, self.mechanism(name)) for name in self.attributes]

    def _context(self, v: str, values: torch.Tensor) -> torch.Tensor | None:
        """Normalised parents of ``v`` from (B, P) normalised values: (B, |pa(v)|), or None for a root."""
        ps = self.scm.parents[v]
        return values[:, [self._col[p] for p in ps]] if ps else None

    def _check_pa(self, pa: torch.Tensor) -> None:
        if pa.ndim != 2 or pa.shape[1] != len(self._col):
            raise ValueError(
                f"pa must be (B, {len(self._col)}) in columns {self.transform.names}, got {tuple(pa.shape)}"
            )

    def _do_values(self, do: Intervention, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Validate an intervention and return each target as (B,) in data units."""
        self.scm.check_names(do)
        out: dict[str, torch.Tensor] = {}
        for name, value in do.items():
            try:
                target = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                raise InterventionError(f"do({name}): {value!r} is not a number or a tensor of numbers") from None
            if target.numel() not in (1, batch):
                raise InterventionError(f"do({name}): expected a scalar or {batch} values, got {target.numel()}")
            if not torch.isfinite(target).all():
                raise InterventionError(f"do({name}): value is not finite")
            self.transform.check_support(name, float(target.min()))
            self.transform.check_support(name, float(target.max()))
            out[name] = target.expand(batch)
        return out

    # -- attribute part ------------------------------------------------------------------------
    def abduct_parents(self, pa: torch.Tensor) -> torch.Tensor:
        """Exogenous noise of every variable: (B, P) data units -> (B, P) u, columns as ``pa``."""
        self._check_pa(pa)
        v = self.transform.normalise(pa)
        u = torch.empty_like(v)
        for name, mech in self.mechanisms():
            i = self._col[name]
            u[:, i : i + 1] = mech.inverse_map(v[:, i : i + 1], self._context(name, v))
        return u

    def counterfactual_parents(self, pa: torch.Tensor, do: Intervention) -> torch.Tensor:
        """pa~ (B, P) data units: intervened variables set, their descendants re-predicted from their
        abducted noise, every other variable copied bit-exactly from ``pa``."""
        self._check_pa(pa)
        targets = self._do_values(do, pa.shape[0], pa)
        changed = self.scm.descendants(list(targets)) - set(targets)
        out = pa.clone()
        for name, t in targets.items():
            out[:, self._col[name]] = t
        if not changed:
            return out
        u = self.abduct_parents(pa)
        v = self.transform.normalise(out)  # normalised counterfactual values, filled in order
        for name in self.scm.order:
            if name in changed:
                i = self._col[name]
                v[:, i : i + 1] = self.mechanism(name).forward_map(u[:, i : i + 1], self._context(name, v))
        new = self.transform.denormalise(v)
        for name in changed:
            out[:, self._col[name]] = new[:, self._col[name]]
        return out

    def flow_log_prob(self, pa: torch.Tensor) -> torch.Tensor:
        """Sum over variables of log p(v | pa(v)) on normalised values, (B,): the flows' objective."""
        self._check_pa(pa)
        v = self.transform.normalise(pa)
        total = torch.zeros(pa.shape[0], dtype=v.dtype, device=v.device)
        for name, mech in self.mechanisms():
            i = self._col[name]
            total = total + mech.log_prob(v[:, i : i + 1], self._context(name, v))
        return total

    @torch.no_grad()
    def sample_parents(self, n: int) -> torch.Tensor:
        """Ancestral samples of the variables: (n, P) in data units."""
        device = next(self.parameters()).device
        v = torch.zeros(n, len(self._col), device=device)
        for name, mech in self.mechanisms():
            i = self._col[name]
            v[:, i : i + 1] = mech.forward_map(torch.randn(n, 1, device=device), self._context(name, v))
        return self.transform.denormalise(v)


class DSCM(AttributeModel):
    """Deep SCM: the attribute model plus the image mechanism, whose parents are ``scm.image_parents``."""

    def __init__(
        self,
        scm: SCM,
        attribute_mechanisms: Mapping[str, nn.Module],
        image_mechanism: nn.Module,
        transform: VariableTransform,
    ):
        super().__init__(scm, attribute_mechanisms, transform)
        if not isinstance(image_mechanism, ImageMechanism):
            raise ConfigError("image mechanism lacks loss/abduct/predict/sample")
        self.image = image_mechanism
        self._image_cols = [self._col[n] for n in scm.image_parents]

    def image_parents(self, pa_norm: torch.Tensor) -> torch.Tensor:
        """(B, P) normalised values -> (B, P_x) the image mechanism's parents."""
        return pa_norm[:, self._image_cols]

    # -- image part ----------------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: torch.Tensor, t: float = 0.0) -> Exogenous:
        """Exogenous state of images x (B, 1, H, W) under their factual parents (data units)."""
        self._check_pa(pa)
        return self.image.abduct(x, self.image_parents(self.transform.normalise(pa)), t)

    def predict(self, exogenous: Exogenous, pa: torch.Tensor) -> torch.Tensor:
        """The image (B, 1, H, W) of an abducted state under parents ``pa`` (data units)."""
        self._check_pa(pa)
        return self.image.predict(exogenous, self.image_parents(self.transform.normalise(pa)))

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, do: Intervention, t: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Abduction, action, prediction: (x~ (B, 1, H, W), pa~ (B, P) data units).

        t scales the posterior noise of the abducted latents (0: posterior means)."""
        pa_cf = self.counterfactual_parents(pa, do)
        return self.predict(self.abduct(x, pa, t), pa_cf), pa_cf

    @torch.no_grad()
    def sample(self, n: int, t: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples: (x (n, 1, H, W), pa (n, P) data units); t is the image prior's temperature."""
        pa = self.sample_parents(n)
        x = self.image.sample(self.image_parents(self.transform.normalise(pa)), t)
        return x, pa
