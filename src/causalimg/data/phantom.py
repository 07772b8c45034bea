"""The ``phantom`` data set: synthetic straightened coronary CPRs whose causal model is known.

Because causalimg writes the generator, it can regenerate the TRUE counterfactual of any image:
the same exogenous state (geometry, plaque sites, contrast, texture, noise, severity) rendered
with intervened variables. Variables are the calcified plaque, non-calcified plaque and lumen
areas (mm^2) in each region of the configured partitioner, which may be any AXIAL partition
(``phantom_regions``); with ``age_effect > 0`` an ``age`` root (years) raises every plaque area
by the factor ``exp(age_effect * (age - 60) / 20)``. Optional confounds (``phantom_confounds``)
add a per-image disease severity that correlates plaque across regions and carries non-local cues.

Splits are generated in chunks, vectorised, and cached on disk as ``.npy`` files under
``root/phantom-<config hash>/<split>/`` (written to temporary names and renamed when complete).
See docs/data.md for the generative model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt, field_validator
from torch.utils.data import Dataset

import causalimg
from causalimg.core.data import Split
from causalimg.core.regions import Partitioner
from causalimg.core.schema import Structure, Variable, VariableSchema
from causalimg.data import phantom_geometry as geo
from causalimg.data import phantom_interventions as interventions
from causalimg.data import phantom_regions as regions
from causalimg.data import phantom_render as render
from causalimg.data.phantom_confounds import ConfoundConfig
from causalimg.errors import CausalImgError, ConfigError, DataError, InterventionError
from causalimg.plugins.specs import DatasetSpec
from causalimg.strict import Seed, StrictModel

GENERATOR_VERSION = 2  # bump when the generative model changes: it invalidates caches
CHUNK = 64  # images rendered per vectorised call
AGE = "age"
LANDMARKS_KEY = "boundaries_mm"  # per-image metadata: the image's landmark cut points (mm)


class PhantomConfig(StrictModel):
    """The phantom's size, resolution, seed, causal graph and confounds."""

    name: Literal["phantom"] = "phantom"
    spacing_mm: PositiveFloat = 0.5  # 0.5 -> 32 x 192 pixels, 0.25 -> 64 x 384 (the paper's)
    n_train: PositiveInt = 4000
    n_val: PositiveInt = 500
    n_test: PositiveInt = 500
    seed: Seed = 0
    age_effect: NonNegativeFloat = 0.0  # > 0 adds an age root that raises every plaque area
    confounds: ConfoundConfig = ConfoundConfig()  # all 0: the clean phantom (the control)
    cache: bool = True  # keep generated splits on disk under the data root

    @field_validator("spacing_mm")
    @classmethod
    def _divides_thirds(cls, v: float) -> float:
        for length in (geo.THIRD_MM, geo.FOV_H):
            if abs(length / v - round(length / v)) > 1e-9:
                raise ValueError(f"spacing_mm={v} must divide {length:g} mm (e.g. 0.25 or 0.5)")
        if v > 1.0:
            raise ValueError(f"spacing_mm={v} is coarser than 1 mm: the vessel would be a few pixels wide")
        return v


# The phantom's classes (label order of its masks) and structures, in variable order.
CLASSES = ("background", "lumen", "calcified", "noncalcified")
STRUCTURES = (
    Structure("cpa", 2, "calcified plaque area", "CPA"),
    Structure("ncpa", 3, "non-calcified plaque area", "NCPA"),
    Structure("la", 1, "lumen area", "LA"),
)
assert tuple(s.name for s in STRUCTURES) == interventions.STRUCTURES


def phantom_schema(regions: tuple[str, ...], with_age: bool) -> VariableSchema:
    """The phantom's variables: plaque and lumen areas per region, and ``age`` (a parent of every
    plaque area) when the age effect is on."""
    if not with_age:
        return VariableSchema(CLASSES, STRUCTURES, regions)
    plaque = [VariableSchema.area_name(s.name, r) for s in STRUCTURES[:2] for r in regions]
    age = Variable(AGE, unit="years", title="age")
    return VariableSchema(CLASSES, STRUCTURES, regions, extra=(age,), parents={v: (AGE,) for v in plaque})


@dataclass(frozen=True)
class Rendered:
    """One rendered batch: numpy arrays as stored in the cache."""

    image: np.ndarray  # (B, 1, H, W) float32
    fg: np.ndarray  # (B, 3, H, W) uint16 quantised lumen, calcified, non-calcified fractions
    parents: np.ndarray  # (B, P) float32 measured parents (age first when present)
    exogenous: np.ndarray  # (B, E) float64 packed exogenous state


RENDERED = tuple(f.name for f in fields(Rendered))  # one cached .npy file each


class PhantomSource:
    """The phantom as a :class:`~causalimg.core.data.DataSource` with true counterfactuals.

    ``regions`` is the (K, H, W) partition when it is the same for every image, else None (then
    each item's ``regions`` come from its landmarks, ``metadata(exogenous)``).
    """

    def __init__(self, config: PhantomConfig, partitioner: Partitioner, root: Path):
        self.config = config
        self.grid = geo.Grid(config.spacing_mm)
        self.image_shape = self.grid.shape
        self.spacing_mm = config.spacing_mm
        self.partitioner = partitioner
        self.region_names = tuple(partitioner.region_names)
        if not 1 <= len(self.region_names) <= geo.MAX_REGIONS:
            raise ConfigError(
                f"data.phantom: the partitioner has {len(self.region_names)} regions; the phantom takes 1 to "
                f"{geo.MAX_REGIONS}"
            )
        if regions.blur_px(config.spacing_mm) > regions.margin_px(config.spacing_mm):
            raise ConfigError(f"data.phantom: the point spread reaches past the {geo.MARGIN_MM:g} mm locality margin")
        self.num_cuts = len(self.region_names) - 1
        self.with_age = config.age_effect > 0
        self.num_roots = 3 * geo.NUM_THIRDS + int(self.with_age)
        self.schema = phantom_schema(self.region_names, self.with_age)
        self.variables = self.schema.names
        self.root = Path(root)
        self._cache: dict[str, dict[str, NpyRows]] = {}
        self.regions, probe = self._partition()
        self.per_image = self.regions is None
        where = "in every image" if not self.per_image else "in the phantom's train image 0"
        columns = regions.column_regions(probe[None], self.region_names, self.spacing_mm, where)  # (1, W)
        geometry = regions.region_geometry(columns, len(self.region_names), self.grid)
        geometry.check_lengths(self.region_names, where)
        self._partition_digest = hashlib.sha256(
            json.dumps([type(partitioner).__module__, type(partitioner).__qualname__, self.region_names,
                        self.per_image]).encode() + probe.numpy().tobytes()
        ).hexdigest()  # fmt: skip

    def _partition(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The fixed (K, H, W) masks (None when they differ per image) and the masks of a probe image."""
        h, w = self.image_shape
        try:
            fixed = self.partitioner.masks(h, w, self.spacing_mm).float()
        except CausalImgError:  # needs per-image metadata, e.g. landmarks
            fixed = None
        probe_meta = self.metadata(self.exogenous_batch("train", [0]))[0]
        try:
            probe = self.partitioner.masks(h, w, self.spacing_mm, probe_meta).float()
        except CausalImgError as err:
            raise ConfigError(
                f"data.phantom: partitioner with regions {self.region_names} cannot cut the phantom's images "
                f"({err}); the phantom gives every image the metadata {LANDMARKS_KEY!r} ({self.num_cuts} cut points "
                f"in mm, equal lengths jittered per image)"
            ) from None
        if probe.shape != (len(self.region_names), h, w):
            raise ConfigError(
                f"data.phantom: partitioner masks have shape {tuple(probe.shape)}; expected {(len(self.region_names), h, w)}"
            )
        return (fixed if fixed is not None and torch.equal(fixed, probe) else None), probe

    @classmethod
    def from_config(cls, config: PhantomConfig, *, partitioner: Partitioner, root: Path) -> PhantomSource:
        return cls(config, partitioner, root)

    def __getstate__(self) -> dict:
        """Data-loader workers reopen the cache files instead of receiving open handles."""
        return {**self.__dict__, "_cache": {}}

    # -- sizes and the cache -------------------------------------------------------------------
    def size(self, split: Split) -> int:
        return {"train": self.config.n_train, "val": self.config.n_val, "test": self.config.n_test}[split]

    @property
    def cache_dir(self) -> Path:
        spec = self.config.model_dump(exclude={"cache", "n_train", "n_val", "n_test"})
        key = json.dumps([GENERATOR_VERSION, spec, self._partition_digest], sort_keys=True)
        return self.root / f"phantom-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def _split_arrays(self, split: Split) -> dict[str, NpyRows]:
        """The cached split as row readers, generated (streaming, atomically) on first use."""
        if split not in self._cache:
            folder = self.cache_dir / f"{split}-{self.size(split)}"
            if not (folder / "done.json").exists():
                self._generate_to(folder, split)
            try:  # np.load refuses pickles (allow_pickle=False): a tampered cache cannot run code
                self._cache[split] = {n: NpyRows(folder / f"{n}.npy") for n in RENDERED}
            except (OSError, ValueError) as err:
                raise DataError(f"phantom cache {folder} is unreadable ({err}); delete it to regenerate") from None
        return self._cache[split]

    def _generate_to(self, folder: Path, split: Split) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        n = self.size(split)
        tag = f".tmp-{os.getpid()}"
        first = self.render_indices(split, np.arange(min(CHUNK, n)))
        # appended chunk by chunk with plain writes: nothing of the split stays mapped in memory
        with contextlib.ExitStack() as stack:
            outs = {name: stack.enter_context(open(folder / f"{name}.npy{tag}", "wb")) for name in vars(first)}
            for name, arr in vars(first).items():
                header = {
                    "descr": np.lib.format.dtype_to_descr(arr.dtype),
                    "fortran_order": False,
                    "shape": (n, *arr.shape[1:]),
                }
                np.lib.format.write_array_header_2_0(outs[name], header)
            for start in range(0, n, CHUNK):
                part = first if start == 0 else self.render_indices(split, np.arange(start, min(start + CHUNK, n)))
                for name, arr in vars(part).items():
                    outs[name].write(np.ascontiguousarray(arr).tobytes())
        for name in outs:
            os.replace(folder / f"{name}.npy{tag}", folder / f"{name}.npy")
        manifest = {"config": self.config.model_dump(mode="json"), "regions": list(self.region_names),
                    "split": split, "size": n}  # fmt: skip
        (folder / f"done.json{tag}").write_text(json.dumps(manifest, indent=1))
        os.replace(folder / f"done.json{tag}", folder / "done.json")

    # -- exogenous state and regions -----------------------------------------------------------
    def exogenous_batch(self, split: Split, indices: Sequence[int] | np.ndarray) -> geo.PhantomExogenous:
        """The exogenous state of images ``indices`` of ``split`` (regenerated from the seed)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size(split)):
            raise IndexError(f"phantom {split} split has {self.size(split)} images; got indices {idx.tolist()}")

        def cuts(u: np.ndarray) -> np.ndarray:
            return regions.landmark_cuts(u, len(self.region_names), self.spacing_mm)

        return geo.draw_exogenous(self.config.seed, split, idx, self.with_age, cuts, self.config.confounds)

    def exogenous(self, split: Split, index: int) -> geo.PhantomExogenous:
        return self.exogenous_batch(split, [index])

    def unpack(self, packed: np.ndarray) -> geo.PhantomExogenous:
        """The exogenous state from an item's packed ``exogenous`` vector (E,) or a batch (B, E)."""
        return geo.PhantomExogenous.unpack(packed, self.num_roots, self.num_cuts)

    def metadata(self, exo: geo.PhantomExogenous) -> list[dict[str, Any]]:
        """Per-image metadata a partitioner may read: the landmark cut points (mm) and where they come from."""
        return [
            {LANDMARKS_KEY: cuts.tolist(), "source": f"phantom image {tuple(int(k) for k in key)} (seed, split, index)"}
            for cuts, key in zip(exo.boundaries_mm, exo.key)
        ]

    def region_masks(self, exo: geo.PhantomExogenous) -> torch.Tensor:
        """Region masks of the images of ``exo``: (1, K, H, W) for a fixed partition, else (B, K, H, W)."""
        if self.regions is not None:
            return self.regions[None]
        h, w = self.image_shape
        return torch.stack([self.partitioner.masks(h, w, self.spacing_mm, m).float() for m in self.metadata(exo)])

    def _geometry(self, exo: geo.PhantomExogenous, masks: torch.Tensor) -> regions.RegionGeometry:
        """Cores and windows of every image's regions (checked: axial, long enough), batch-sized."""
        if self.per_image:
            where = f"in phantom image {tuple(int(k) for k in exo.key[0])}" if len(exo) == 1 else "in a phantom image"
        else:
            where = "in every image"
        columns = regions.column_regions(masks, self.region_names, self.spacing_mm, where)  # (1 or B, W)
        geometry = regions.region_geometry(columns, len(self.region_names), self.grid)
        geometry.check_lengths(self.region_names, where, InterventionError)  # per image: this image's regions
        return regions.RegionGeometry(*(np.broadcast_to(a, (len(exo), *a.shape[1:])) for a in vars(geometry).values()))

    # -- the mechanisms ------------------------------------------------------------------------
    def third_targets(self, exo: geo.PhantomExogenous, age: np.ndarray | None = None) -> np.ndarray:
        """Observational areas per anatomical third (B, 9: cpa, ncpa, la), age mechanism applied.

        ``age`` (B,) overrides the exogenous age where it is not NaN (an intervention on age).
        """
        values = exo.u[:, int(self.with_age) :].copy()  # (B, 9)
        if self.with_age:
            a = exo.u[:, 0] if age is None else np.where(np.isnan(age), exo.u[:, 0], age)
            factor = np.exp(self.config.age_effect * (a - 60.0) / 20.0)[:, None]  # (B, 1)
            values[:, : 2 * geo.NUM_THIRDS] = values[:, : 2 * geo.NUM_THIRDS] * factor
        return values

    def render(
        self, exo: geo.PhantomExogenous, interventions: np.ndarray | None = None, strict: bool = False
    ) -> Rendered:
        """Render ``exo`` under ``interventions`` (B, P) in variable order, NaN = none (None: observational).

        ``strict`` raises InterventionError where a target cannot be met in an image's geometry.
        """
        parts = [
            self._render_chunk(exo.select(slice(s, s + CHUNK)), None if interventions is None else interventions[s : s + CHUNK], strict)
            for s in range(0, len(exo), CHUNK)
        ]  # fmt: skip
        return Rendered(*(np.concatenate([getattr(p, f) for p in parts]) for f in RENDERED))

    def _render_chunk(self, exo: geo.PhantomExogenous, todo: np.ndarray | None, strict: bool) -> Rendered:
        b, k = len(exo), len(self.region_names)
        age = todo[:, 0] if todo is not None and self.with_age else None
        p = geo.profiles(exo, self.grid)
        shapes, fits = geo.observe(p, self.grid, self.third_targets(exo, age))
        if strict and age is not None and not fits[~np.isnan(age)].all():
            i = int(np.argwhere(~fits.all(1) & ~np.isnan(age))[0, 0])
            raise InterventionError(
                f"age={age[i]:g}: the plaque it grows does not fit this phantom image's geometry (it would leave "
                f"the {geo.FOV_H:g} mm field of view)"
            )
        masks = self.region_masks(exo)
        targets = None if todo is None else todo[:, int(self.with_age) :].reshape(b, 3, k)
        if targets is not None and not np.isnan(targets).all():
            geometry = self._geometry(exo, masks)
            growth = interventions.growth_profiles(exo, p, geometry, self.grid)
            shapes, unreachable = interventions.intervene(shapes, targets, geometry, growth, self.grid)
            if strict and unreachable:
                raise self._unreachable(unreachable[0])
        fg, vessel = render.fractions(geo.layout(shapes), self.grid)
        image = render.image(exo, self.grid, fg, vessel)
        parents = self.schema.measure(torch.from_numpy(render.soft_masks(fg)), masks, self.spacing_mm**2).numpy()
        if self.with_age:
            a = exo.u[:, :1] if age is None else np.where(np.isnan(age), exo.u[:, 0], age)[:, None]
            parents = np.concatenate([a.astype(np.float32), parents], axis=1)
        return Rendered(image, fg, parents, exo.pack())

    def _unreachable(self, miss: interventions.Unreachable) -> InterventionError:
        s = STRUCTURES[miss.structure]
        name = self.schema.area_name(s.name, self.region_names[miss.region])
        asked = f"{name}={miss.target:.3f} mm^2"
        if miss.moved is not None:
            other = self.schema.area_name(STRUCTURES[miss.moved[0]].name, self.region_names[miss.moved[1]])
            return InterventionError(
                f"{asked} cannot be set in this phantom image without changing {other}: the edit would push it "
                f"out of the {geo.FOV_H:g} mm field of view"
            )
        if miss.target < miss.least:
            why = (
                f"the lumen keeps at least {geo.LUMEN_FLOOR:.0%} of its radius and does not change within "
                f"{geo.MARGIN_MM:g} mm of a neighbouring region"
                if s.name == "la"
                else f"{s.title.removesuffix(' area')} within {geo.MARGIN_MM:g} mm of a neighbouring region stays "
                f"as it is, so that pixels outside the region do not change"
            )
            return InterventionError(
                f"{asked} is below the least this phantom image allows ({miss.least:.3f} mm^2): {why}"
            )
        return InterventionError(
            f"{asked} does not fit this phantom image's geometry (at most {miss.most:.3f} mm^2: more would leave "
            f"the {geo.FOV_H:g} mm field of view)"
        )

    def render_indices(self, split: Split, indices: np.ndarray) -> Rendered:
        return self.render(self.exogenous_batch(split, indices))

    # -- data-source API -----------------------------------------------------------------------
    def split(self, name: Split) -> Dataset:
        if name not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {name!r}; expected train, val or test")
        return PhantomDataset(self, name)

    def _interventions_array(self, todo: Sequence[Mapping[str, float]]) -> np.ndarray:
        out = np.full((len(todo), len(self.variables)), np.nan)
        for i, do in enumerate(todo):
            for name, value in do.items():
                if name not in self.variables:
                    raise InterventionError(f"unknown variable {name!r}; the phantom's are {', '.join(self.variables)}")
                if not np.isfinite(value) or (name != AGE and value < 0):
                    raise InterventionError(f"{name}={value}: an area must be a finite value >= 0 mm^2")
                out[i, self.variables.index(name)] = float(value)
        return out

    def true_counterfactual_batch(
        self, split: Split, indices: Sequence[int], interventions: Sequence[Mapping[str, float]]
    ) -> dict[str, torch.Tensor]:
        """True counterfactuals of images ``indices``: ``image`` (B,1,H,W), ``masks``, ``labels``, ``parents``
        and the images' ``regions`` (B, K, H, W).

        ``interventions[i]`` maps variable names to values (mm^2, years for age); descendants of an
        intervened variable follow the true mechanism; a target that cannot be met raises InterventionError.
        """
        if len(indices) != len(interventions):
            raise InterventionError(f"{len(indices)} indices but {len(interventions)} interventions")
        return self._counterfactual(self.exogenous_batch(split, indices), interventions)

    def true_counterfactual(
        self, exogenous: geo.PhantomExogenous, interventions: Mapping[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same exogenous state (one image) rendered under ``interventions``: image, masks, parents."""
        out = self._counterfactual(exogenous.select(slice(0, 1)), [interventions])
        return out["image"][0], out["masks"][0], out["parents"][0]

    def _counterfactual(
        self, exo: geo.PhantomExogenous, todo: Sequence[Mapping[str, float]]
    ) -> dict[str, torch.Tensor]:
        r = self.render(exo, self._interventions_array(todo), strict=True)
        masks = torch.from_numpy(render.soft_masks(r.fg))
        regions_ = self.region_masks(exo).expand(len(exo), -1, -1, -1)
        return {"image": torch.from_numpy(r.image), "masks": masks, "labels": masks.argmax(1),
                "parents": torch.from_numpy(r.parents), "regions": regions_}  # fmt: skip


class PhantomDataset(Dataset):
    """One split of the phantom: items as documented in ``core.data`` plus ``exogenous`` (E,) float64."""

    def __init__(self, source: PhantomSource, split: Split):
        self.source, self.split_name = source, split

    def __len__(self) -> int:
        return self.source.size(self.split_name)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"phantom {self.split_name} split has {len(self)} images; got index {index}")
        if self.source.config.cache:
            arrays = self.source._split_arrays(self.split_name)
            r = Rendered(*(arrays[f].row(index)[None] for f in RENDERED))
        else:
            r = self.source.render_indices(self.split_name, np.array([index]))
        masks = torch.from_numpy(render.soft_masks(r.fg)[0])  # (C, H, W)
        if self.source.regions is not None:
            item_regions = self.source.regions
        else:
            item_regions = self.source.region_masks(self.source.unpack(r.exogenous[0]))[0]
        return {
            "image": torch.from_numpy(r.image[0]),
            "masks": masks,
            "labels": masks.argmax(0),
            "parents": torch.from_numpy(r.parents[0]),
            "regions": item_regions,
            "index": torch.tensor(index, dtype=torch.int64),
            "exogenous": torch.from_numpy(r.exogenous[0]),
        }

    def metadata(self, index: int) -> Mapping[str, Any]:
        """The item's per-image metadata (its landmark cut points), as a folder data set gives it."""
        return self.source.metadata(self.source.exogenous(self.split_name, index))[0]


class NpyRows:
    """Rows of a cached .npy array read with positioned reads (``os.pread``).

    A memory map would count every page it ever touched in the process's resident set (a paper-sized
    epoch showed 11 GB per process); positioned reads leave those pages to the kernel's page cache,
    so the data side's own memory stays at a few batches whatever the data set's size.
    """

    def __init__(self, path: Path):
        header = np.load(path, mmap_mode="r")  # validates the header; refuses pickled object arrays
        self.path, self.dtype, self.shape, self.offset = path, header.dtype, header.shape, header.offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del header
        self._fd = os.open(path, os.O_RDONLY)

    def row(self, index: int) -> np.ndarray:
        """Row ``index`` as a fresh array of shape ``shape[1:]``."""
        data = os.pread(self._fd, self.row_bytes, self.offset + index * self.row_bytes)
        if len(data) != self.row_bytes:
            raise DataError(f"phantom cache {self.path} is truncated at row {index}; delete it to regenerate")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:]).copy()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


@causalimg.hookimpl
def causalimg_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(
            name="phantom",
            config=PhantomConfig,
            factory=PhantomSource.from_config,
            summary="Synthetic coronary sCPR phantom with ground-truth counterfactuals",
        )
    ]


__all__ = ["PhantomConfig", "PhantomDataset", "PhantomSource", "Rendered"]
