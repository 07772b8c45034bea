"""A trained model in one object: load it, ask it "what if", get the images and what they show.

``CounterfactualModel.from_pretrained(path)`` loads a run folder or an exported model folder
(``api.bundle``) through ``Builder``; ``counterfactual(images, do)`` abducts, intervenes and
predicts with the DSCM's public surface (``abduct``, ``counterfactual_parents``, ``predict``), so
any image mechanism works, and measures the result with the EVALUATION segmentor.

Factual parents come from, in order of preference: the caller (``parents``), the caller's masks
(``masks``, measured with the schema's measurement, as the data sets measure theirs), or the
frozen GUIDANCE segmentor. Reading them with the guidance segmentor keeps the evaluation segmentor
out of everything that makes the image, as in the pipeline: it only scores, so its own errors do
not cancel between the factual reading and the counterfactual measurement.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from causalimg.api.bundle import ModelFiles, locate
from causalimg.api.images import InputConvention, input_convention
from causalimg.api.interventions import Intervention, OutOfSupport, describe, parse_intervention, resolve
from causalimg.builder import Builder, load_schema, load_transform
from causalimg.config.loader import load_config
from causalimg.config.run import RunConfig, mechanism_of
from causalimg.core.data import DataSource
from causalimg.core.guidance import GuidancePredictors, SamplingGuidance
from causalimg.core.mechanism import Exogenous
from causalimg.core.regions import Partitioner, batch_region_masks
from causalimg.core.schema import VariableSchema
from causalimg.core.scm import DSCM
from causalimg.core.transform import VariableTransform
from causalimg.errors import CausalImgError, ConfigError, DataError
from causalimg.plugins.manager import Registry, load_registry
from causalimg.predictors.frozen import load_frozen

GIVEN, MASKS, SEGMENTOR = "given", "masks", "guidance-segmentor"  # where factual parents came from
PRECISIONS = ("fp32", "bf16")  # bf16: autocast, about 1.5x faster on CPUs with bf16 support; fp32 the default


@dataclass
class Factual:
    """Images ready for interventions: their parents, regions and abducted exogenous state.

    images (B, 1, H, W) and parents (B, P) on the CPU; regions (B or 1, K, H, W); measured (B, V):
    the evaluation segmentor's areas of the factual images; chunks: (start, stop, exogenous state)
    per abduction batch, on the model's device.
    """

    images: torch.Tensor
    parents: torch.Tensor
    regions: torch.Tensor
    measured: torch.Tensor
    parents_source: dict[str, str]
    chunks: list[tuple[int, int, Any]] = field(repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class CounterfactualResult:
    """What ``counterfactual`` made, on the CPU, in data units (mm^2 for areas).

    images / factual_images: (B, 1, H, W) in [-1, 1]; parents / factual_parents: (B, P), columns
    ``schema.names``; measured / measured_factual: (B, V) the evaluation segmentor's area of every
    structure in every region (columns ``schema.area_names``) on x~ and on x; masks: (B, C, H, W) its
    class probabilities on x~, from which ``measured`` is computed; targets: intervened
    variable -> (B,) value asked (after clamping), requested: before clamping, clamped: (B,) bool;
    parents_source: variable -> ``given``, ``masks`` or ``guidance-segmentor``.
    """

    images: torch.Tensor
    parents: torch.Tensor
    factual_images: torch.Tensor
    factual_parents: torch.Tensor
    measured: torch.Tensor
    measured_factual: torch.Tensor
    masks: torch.Tensor
    targets: dict[str, torch.Tensor]
    requested: dict[str, torch.Tensor]
    clamped: dict[str, torch.Tensor]
    regions: torch.Tensor
    parents_source: dict[str, str]
    intervention: str
    schema: VariableSchema = field(repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def source(self) -> str:
        """Where the factual area variables came from (``mixed`` when several sources were used)."""
        used = {self.parents_source[n] for n in self.schema.area_names}
        return used.pop() if len(used) == 1 else "mixed"

    @property
    def difference(self) -> torch.Tensor:
        """x~ - x, (B, 1, H, W) in [-2, 2]."""
        return self.images - self.factual_images

    @property
    def asked(self) -> torch.Tensor:
        """(B, V) the area variables of pa~: what x~ was asked to show."""
        return self.parents[:, list(self.schema.area_columns)]

    def errors(self) -> torch.Tensor:
        """(B, V) |measured - asked| in mm^2, the per-image cells of Table 1 for this intervention."""
        return (self.measured - self.asked).abs()

    def areas(self, which: str = "measured") -> dict[str, dict[str, torch.Tensor]]:
        """structure -> region -> (B,) areas: ``measured`` (x~), ``measured_factual`` (x), ``asked`` (pa~)."""
        table = {"measured": self.measured, "measured_factual": self.measured_factual, "asked": self.asked}[which]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for column, variable in enumerate(self.schema.areas):
            assert variable.structure is not None and variable.region is not None
            out.setdefault(variable.structure, {})[variable.region] = table[:, column]
        return out

    def rows(self, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per image and area variable: factual, asked, measured on x and x~, error, intervened."""
        labels = list(labels) if labels is not None else [str(i) for i in range(len(self))]
        columns = list(self.schema.area_columns)
        errors = self.errors()
        rows = []
        for b, label in enumerate(labels):
            for v, variable in enumerate(self.schema.areas):
                name = variable.name
                rows.append(
                    {
                        "image": label,
                        "variable": name,
                        "structure": variable.structure,
                        "region": variable.region,
                        "intervened": name in self.targets,
                        "factual": float(self.factual_parents[b, columns[v]]),
                        "requested": float(self.requested[name][b]) if name in self.requested else None,
                        "asked": float(self.asked[b, v]),
                        "measured_factual": float(self.measured_factual[b, v]),
                        "measured": float(self.measured[b, v]),
                        "error": float(errors[b, v]),
                        "clamped": bool(self.clamped[name][b]) if name in self.clamped else False,
                        "parents_source": self.parents_source[name],
                    }
                )
        return rows


class CounterfactualModel:
    """A fine-tuned DSCM, the frozen segmentors and the partitioner of one run, on one device."""

    def __init__(
        self,
        *,
        dscm: DSCM,
        evaluation_segmentor: nn.Module,
        guidance_segmentor: nn.Module,
        partitioner: Partitioner,
        registry: Registry,
        schema: VariableSchema,
        files: ModelFiles,
        config: RunConfig,
        inputs: InputConvention,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = True,
        guidance: SamplingGuidance | None = None,
    ):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r}: choose {' or '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dscm = dscm.to(self.device).to(memory_format=self.memory_format).eval()
        self.evaluation_segmentor = evaluation_segmentor.to(self.device).to(memory_format=self.memory_format).eval()
        self.guidance_segmentor = guidance_segmentor.to(self.device).to(memory_format=self.memory_format).eval()
        self.partitioner, self.registry, self.schema = partitioner, registry, schema
        self.files, self.config, self.inputs = files, config, inputs
        self.image_shape: tuple[int, int] = files.image_shape
        self.spacing_mm: float = files.spacing_mm
        self.strategy: str = files.strategy
        self.temperature: float = float(config.finetune.temperature)
        self.guidance = guidance  # a sampling-time strategy's terms, which steer every prediction
        if guidance is not None:
            for strategy in guidance.strategies:
                strategy.to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        strategy: str | None = None,
        device: str | torch.device = "cpu",
        *,
        check_versions: bool = True,
        precision: str = "fp32",
        channels_last: bool = True,
    ) -> CounterfactualModel:
        """Load one strategy from a run folder or an exported model folder.

        strategy None: the exported folder's, or ``positional-segmentor`` (or the only one) of a run.
        check_versions False: load an exported model written by another causalimg/torch, with a warning.
        precision ``bf16`` runs the networks under bf16 autocast; channels_last stores activations
        channel-minor (faster convolutions on CPUs; the same computation up to float round-off).
        """
        files = locate(path, strategy, check_versions=check_versions)
        config = load_config(files["config"])
        registry = load_registry(config.plugins.dirs)
        build = Builder(config, registry, mechanism_of(config, files.strategy))
        schema = load_schema(files["schema"].parent)
        transform = load_transform(files["transform"].parent)
        dscm = build.trained_dscm(schema, files.image_shape, transform, files["dscm"])
        segmentors = {
            role: load_frozen(build.segmentor(schema), files[role])
            for role in ("evaluation-segmentor", "guidance-segmentor")
        }
        guidance = None
        strategy_name = files.strategy.rsplit("/", 1)[-1]
        if strategy_name in config.finetune.sampling_time:
            regressor = load_frozen(build.regressor(schema), files["regressor"]) if "regressor" in files.files else None
            predictors = GuidancePredictors(segmentor=segmentors["guidance-segmentor"], regressor=regressor)
            scale = config.finetune.sampling_time[strategy_name].scale
            guidance = SamplingGuidance(build.guidance(strategy_name, predictors), schema, files.spacing_mm**2, scale)
        return cls(
            guidance=guidance,
            dscm=dscm,
            evaluation_segmentor=segmentors["evaluation-segmentor"],
            guidance_segmentor=segmentors["guidance-segmentor"],
            partitioner=build.partitioner(),
            registry=registry,
            schema=schema,
            files=files,
            config=config,
            inputs=input_convention(config, files.inputs),
            device=device,
            precision=precision,
            channels_last=channels_last,
        )

    # -- what the model knows ------------------------------------------------------------------
    @property
    def transform(self) -> VariableTransform:
        return self.dscm.transform

    @property
    def names(self) -> tuple[str, ...]:
        return self.schema.names

    @property
    def support(self) -> dict[str, tuple[float, float]]:
        """variable -> (low, high): the observed training range, where interventions must stay."""
        t = self.transform
        return {n: (float(t.low[i]), float(t.high[i])) for i, n in enumerate(t.names)}

    def data_source(self) -> DataSource:
        """The run's own data set (a run folder only: an exported model carries no data)."""
        if self.files.kind != "run":
            raise ConfigError(f"{self.files.root} is an exported model: it carries no data set; give images instead")
        return Builder(self.config, self.registry).data_source(self.files.root / "data")

    def regions(self, metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """Region masks of the run's partitioner: (1, K, H, W), or (B, K, H, W) from per-image metadata."""
        h, w = self.image_shape
        try:
            return batch_region_masks(self.partitioner, h, w, self.spacing_mm, metadata)
        except CausalImgError as err:
            raise DataError(
                f"{err}; pass metadata=[...] (one mapping per image) or regions=(B, K, H, W) masks"
            ) from None

    @contextmanager
    def _running(self) -> Iterator[None]:
        """No gradients, and bf16 autocast when asked for."""
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            yield

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device).contiguous(memory_format=self.memory_format)

    def segment(self, images: torch.Tensor, segmentor: str = "evaluation") -> torch.Tensor:
        """(B, C, H, W) class probabilities of a frozen segmentor (``evaluation`` or ``guidance``), on the device."""
        net = self.evaluation_segmentor if segmentor == "evaluation" else self.guidance_segmentor
        with self._running():
            return net(self._place(images)).float().softmax(dim=1).contiguous()

    def measure(self, images: torch.Tensor, regions: torch.Tensor, segmentor: str = "evaluation") -> torch.Tensor:
        """(B, V) areas of every structure in every region, read by a frozen segmentor (soft areas), on the CPU."""
        probs = self.segment(images, segmentor)
        return self.schema.measure(probs, regions.to(self.device), self.spacing_mm**2).cpu()

    # -- the factual side ----------------------------------------------------------------------
    def as_images(self, images: Any) -> torch.Tensor:
        """(B, 1, H, W) float32 on the CPU from a tensor or array of (H, W), (B, H, W) or (B, 1, H, W)."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        x = x.detach().to("cpu", torch.float32)
        if x.ndim == 2:
            x = x[None, None]
        elif x.ndim == 3:
            x = x[:, None]
        h, w = self.image_shape
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (h, w):
            raise DataError(f"images of shape {tuple(x.shape)}; this model takes (B, 1, {h}, {w}) images")
        if x.shape[0] == 0:
            raise DataError("no images given")
        if not torch.isfinite(x).all() or x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6:
            raise DataError(
                f"image values must be finite and in [-1, 1] (got [{float(x.min()):g}, {float(x.max()):g}]); "
                "map intensities as the training data did (e.g. the HU window)"
            )
        return x.clamp(-1, 1)

    def factual_parents(
        self,
        images: torch.Tensor,
        regions: torch.Tensor,
        parents: Any = None,
        masks: Any = None,
    ) -> tuple[torch.Tensor, dict[str, str]]:
        """(B, P) factual parents and where each came from: given, measured from masks, or read by the
        guidance segmentor. ``parents`` may be (B, P), (P,) or {variable: value(s)}; variables a mapping
        leaves out are measured (area variables) or must be given (other variables, e.g. age)."""
        batch = images.shape[0]
        names = self.names
        if parents is not None and not isinstance(parents, Mapping):
            pa = torch.as_tensor(np.asarray(parents) if not isinstance(parents, torch.Tensor) else parents)
            pa = pa.detach().to("cpu", torch.float32)
            pa = pa.expand(batch, -1) if pa.ndim == 1 else pa
            if tuple(pa.shape) != (batch, len(names)):
                raise DataError(
                    f"parents of shape {tuple(pa.shape)}; expected ({batch}, {len(names)}) in columns {list(names)}"
                )
            if not torch.isfinite(pa).all():
                raise DataError("parents are not finite")
            return pa, dict.fromkeys(names, GIVEN)
        given = dict(parents or {})
        unknown = [n for n in given if n not in names]
        if unknown:
            raise DataError(f"parents names unknown variable {unknown[0]!r}; known: {', '.join(names)}")
        missing = [v.name for v in self.schema.extra if v.name not in given]
        if missing:
            raise DataError(
                f"variable{'s' if len(missing) > 1 else ''} {', '.join(missing)} cannot be measured on an image; "
                f"give {'them' if len(missing) > 1 else 'it'} in parents={{...}}"
            )
        pa = torch.zeros(batch, len(names))
        source: dict[str, str] = {}
        areas_wanted = [n for n in self.schema.area_names if n not in given]
        if areas_wanted:
            if masks is not None:
                measured = self.schema.measure(self.as_masks(masks, batch), regions, self.spacing_mm**2)
                how = MASKS
            else:
                measured = self.measure(images, regions, segmentor="guidance")
                how = SEGMENTOR
            for v, name in enumerate(self.schema.area_names):
                pa[:, names.index(name)] = measured[:, v]
                source[name] = how
        for name, value in given.items():
            column = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if column.numel() not in (1, batch) or not torch.isfinite(column).all():
                raise DataError(f"parents[{name!r}]: give one finite number or one per image ({batch})")
            pa[:, names.index(name)] = column.expand(batch)
            source[name] = GIVEN
        return pa, {n: source[n] for n in names}

    def as_masks(self, masks: Any, batch: int) -> torch.Tensor:
        """(B, C, H, W) class fractions from (B, C, H, W) fractions or (B, H, W) integer class labels."""
        m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).cpu()
        c, (h, w) = self.schema.num_classes, self.image_shape
        if m.ndim == 2:
            m = m[None]
        if m.ndim == 3 and not m.is_floating_point():
            if m.min() < 0 or m.max() >= c:
                raise DataError(f"mask labels must be class indices 0..{c - 1} ({', '.join(self.schema.classes)})")
            m = torch.nn.functional.one_hot(m.long(), c).permute(0, 3, 1, 2)
        m = m.float()
        if tuple(m.shape) != (batch, c, h, w):
            raise DataError(
                f"masks of shape {tuple(m.shape)}; expected ({batch}, {c}, {h}, {w}) fractions or ({batch}, {h}, {w}) labels"
            )
        return m

    def factual(
        self,
        images: Any,
        *,
        parents: Any = None,
        masks: Any = None,
        regions: torch.Tensor | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        temperature: float | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> Factual:
        """Read the parents, make the regions and abduct the exogenous state of ``images`` once, for any
        number of interventions. t (``temperature``, default the fine-tuning one) scales the posterior
        noise of the abduction; its draws are seeded by ``seed``."""
        x = self.as_images(images)
        batch = x.shape[0]
        if regions is None:
            regions = self.regions(metadata)
        regions = torch.as_tensor(regions).float().cpu()
        k, (h, w) = len(self.schema.regions), self.image_shape
        if regions.ndim != 4 or regions.shape[0] not in (1, batch) or tuple(regions.shape[1:]) != (k, h, w):
            raise DataError(f"regions of shape {tuple(regions.shape)}; expected (1 or {batch}, {k}, {h}, {w})")
        pa, source = self.factual_parents(x, regions, parents, masks)
        self._warn_outside_support(pa)
        t = self.temperature if temperature is None else float(temperature)
        chunks = []
        with _seeded(seed, self.device), self._running():
            for start in range(0, batch, batch_size):
                stop = min(start + batch_size, batch)
                exo = self.dscm.abduct(self._place(x[start:stop]), pa[start:stop].to(self.device), t)
                chunks.append((start, stop, exo))
        measured = torch.cat([self.measure(x[a:b], _rows(regions, a, b)) for a, b, _ in chunks])
        return Factual(x, pa, regions, measured, source, chunks)

    def _guided(
        self, factual: Factual, start: int, stop: int, exo: Any, pa_cf: torch.Tensor, do: Mapping[str, Any]
    ) -> torch.Tensor:
        """A sampling-time strategy's prediction: gradients flow, so outside inference mode, on copies
        of the inference-mode tensors."""
        copy = lambda t: t.clone().to(self.device)  # noqa: E731 (an inference tensor cannot enter autograd)
        pa, cf = copy(factual.parents[start:stop]), copy(pa_cf)
        intervened = torch.zeros_like(pa, dtype=torch.bool)  # (B, P)
        for name in do:
            intervened[:, self.transform.index(name)] = True
        state = Exogenous(latents=[copy(z) for z in exo.latents], noise=copy(exo.noise))
        regions = copy(_rows(factual.regions, start, stop))
        x = copy(self._place(factual.images[start:stop]))
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            x_cf = self.guidance.predict(self.dscm, state, x, pa, cf, intervened, regions)  # type: ignore[union-attr]
        return x_cf.float().contiguous()

    def _warn_outside_support(self, pa: torch.Tensor) -> None:
        t = self.transform
        outside = ((pa < t.low) | (pa > t.high)).any(0)
        if outside.any():
            names = [n for n, o in zip(t.names, outside.tolist()) if o]
            warnings.warn(
                f"factual parents outside the training range for {', '.join(names)}: the model extrapolates",
                stacklevel=3,
            )

    # -- interventions -------------------------------------------------------------------------
    def counterfactual(
        self,
        images: Any,
        do: Mapping[str, Any] | Intervention,
        *,
        parents: Any = None,
        masks: Any = None,
        regions: torch.Tensor | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        clamp: bool = False,
        temperature: float | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> CounterfactualResult:
        """x~ of ``images`` (or of a ``Factual``) under ``do``: {variable: 35.0 | "+20" | "U(10, 40)" | ...}.

        A target outside a variable's observed support is an ``InterventionError``; ``clamp=True``
        clamps it to the support instead (``result.clamped`` says where). ``seed`` also seeds the
        per-image draws of ``U`` values.
        """
        factual = (
            images
            if isinstance(images, Factual)
            else self.factual(
                images,
                parents=parents,
                masks=masks,
                regions=regions,
                metadata=metadata,
                temperature=temperature,
                seed=seed,
                batch_size=batch_size,
            )
        )
        intervention = parse_intervention(do, self.names)
        policy: OutOfSupport = "clamp" if clamp else "error"
        targets = resolve(intervention, factual.parents, self.transform, seed=seed, policy=policy)
        images_cf, parents_cf, measured, masks = [], [], [], []
        for start, stop, exo in factual.chunks:
            pa = factual.parents[start:stop].to(self.device)
            do_chunk = {n: v[start:stop].to(self.device) for n, v in targets.values.items()}
            with torch.inference_mode():  # the flows in float32 whatever the precision
                pa_cf = self.dscm.counterfactual_parents(pa, do_chunk)
            if self.guidance is None:
                with self._running():
                    x_cf = self.dscm.predict(exo, pa_cf).float().contiguous()
            else:
                x_cf = self._guided(factual, start, stop, exo, pa_cf, targets.values)
            probs = self.segment(x_cf)  # (B, C, H, W)
            regions = _rows(factual.regions, start, stop).to(self.device)
            measured.append(self.schema.measure(probs, regions, self.spacing_mm**2).cpu())
            masks.append(probs.cpu())
            images_cf.append(x_cf.cpu())
            parents_cf.append(pa_cf.cpu())
        return CounterfactualResult(
            images=torch.cat(images_cf),
            parents=torch.cat(parents_cf),
            factual_images=factual.images,
            factual_parents=factual.parents,
            measured=torch.cat(measured),
            measured_factual=factual.measured,
            masks=torch.cat(masks),
            targets=targets.values,
            requested=targets.requested,
            clamped=targets.clamped,
            regions=factual.regions,
            parents_source=factual.parents_source,
            intervention=describe(intervention),
            schema=self.schema,
        )


def _rows(regions: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The regions of images start..stop: shared (1, K, H, W) masks or the per-image slice."""
    return regions if regions.shape[0] == 1 else regions[start:stop]


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global generators for the block and give the caller's state back afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
