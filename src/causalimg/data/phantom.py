"""The ``phantom`` data set: synthetic straightened coronary CPRs whose causal model is known.

Because causalimg writes the generator, it can regenerate the TRUE counterfactual of any image:
the same exogenous state (geometry, plaque sites, contrast, texture, noise) rendered with
intervened variables. Variables are the calcified plaque, non-calcified plaque and lumen areas in
the proximal, mid and distal thirds (mm^2); with ``age_effect > 0`` an ``age`` root (years) raises
every plaque area by the factor ``exp(age_effect * (age - 60) / 20)``.

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
from typing import Literal

import numpy as np
import torch
from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt, field_validator
from torch.utils.data import Dataset

import causalimg
from causalimg.core.data import Split
from causalimg.core.regions import Partitioner
from causalimg.core.schema import Structure, Variable, VariableSchema
from causalimg.data import phantom_geometry as geo
from causalimg.data import phantom_render as render
from causalimg.errors import CausalImgError, ConfigError, DataError, InterventionError
from causalimg.plugins.specs import DatasetSpec
from causalimg.strict import Seed, StrictModel

GENERATOR_VERSION = 1  # bump when the generative model changes: it invalidates caches
CHUNK = 64  # images rendered per vectorised call
AGE = "age"


class PhantomConfig(StrictModel):
    """The phantom's size, resolution, seed and causal graph."""

    name: Literal["phantom"] = "phantom"
    spacing_mm: PositiveFloat = 0.5  # 0.5 -> 32 x 192 pixels, 0.25 -> 64 x 384 (the paper's)
    n_train: PositiveInt = 4000
    n_val: PositiveInt = 500
    n_test: PositiveInt = 500
    seed: Seed = 0
    age_effect: NonNegativeFloat = 0.0  # > 0 adds an age root that raises every plaque area
    cache: bool = True  # keep generated splits on disk under the data root

    @field_validator("spacing_mm")
    @classmethod
    def _divides_regions(cls, v: float) -> float:
        for length in (geo.REGION_MM, geo.FOV_H):
            if abs(length / v - round(length / v)) > 1e-9:
                raise ValueError(f"spacing_mm={v} must divide {length:g} mm (e.g. 0.25 or 0.5)")
        if v > 1.0:
            raise ValueError(f"spacing_mm={v} is coarser than 1 mm: the vessel would be a few pixels wide")
        return v


def _mask_equal_thirds(partitioner: Partitioner, h: int, w: int, spacing: float) -> bool:
    try:
        masks = partitioner.masks(h, w, spacing)
    except CausalImgError:  # e.g. a partitioner that needs per-image metadata: not the fixed thirds
        return False
    thirds = torch.zeros(3, h, w)
    for k in range(3):
        thirds[k, :, k * w // 3 : (k + 1) * w // 3] = 1.0
    return tuple(partitioner.region_names) == geo.REGION_NAMES and torch.equal(masks.cpu().float(), thirds)


# The phantom's classes (label order of its masks) and structures, in variable order.
CLASSES = ("background", "lumen", "calcified", "noncalcified")
STRUCTURES = (
    Structure("cpa", 2, "calcified plaque area", "CPA"),
    Structure("ncpa", 3, "non-calcified plaque area", "NCPA"),
    Structure("la", 1, "lumen area", "LA"),
)


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
    """The phantom as a :class:`~causalimg.core.data.DataSource` with true counterfactuals."""

    def __init__(self, config: PhantomConfig, partitioner: Partitioner, root: Path):
        self.config = config
        self.grid = geo.Grid(config.spacing_mm)
        self.image_shape = self.grid.shape
        self.spacing_mm = config.spacing_mm
        h, w = self.image_shape
        if not _mask_equal_thirds(partitioner, h, w, config.spacing_mm):
            raise ConfigError(
                f"data.phantom: the phantom's variables are defined on the axial thirds "
                f"{geo.REGION_NAMES}; partitioner with regions {tuple(partitioner.region_names)} does not "
                f"give those masks; use partitioner 'axial-thirds'"
            )
        self.partitioner = partitioner
        self.with_age = config.age_effect > 0
        self.schema = phantom_schema(geo.REGION_NAMES, self.with_age)
        self.variables = self.schema.names
        self.regions = partitioner.masks(h, w, config.spacing_mm).float()  # (K, H, W)
        self.root = Path(root)
        self._cache: dict[str, dict[str, np.ndarray]] = {}

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
        digest = hashlib.sha256(json.dumps([GENERATOR_VERSION, spec], sort_keys=True).encode()).hexdigest()
        return self.root / f"phantom-{digest[:12]}"

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
        manifest = {"config": self.config.model_dump(mode="json"), "split": split, "size": n}
        (folder / f"done.json{tag}").write_text(json.dumps(manifest, indent=1))
        os.replace(folder / f"done.json{tag}", folder / "done.json")

    # -- generation ----------------------------------------------------------------------------
    def exogenous_batch(self, split: Split, indices: Sequence[int]) -> geo.PhantomExogenous:
        """The exogenous state of images ``indices`` of ``split`` (regenerated from the seed)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size(split)):
            raise IndexError(f"phantom {split} split has {self.size(split)} images; got indices {idx.tolist()}")
        return geo.draw_exogenous(self.config.seed, split, idx, self.with_age)

    def exogenous(self, split: Split, index: int) -> geo.PhantomExogenous:
        return self.exogenous_batch(split, [index])

    def structural_values(self, exo: geo.PhantomExogenous, interventions: np.ndarray) -> np.ndarray:
        """The true mechanism: variable values (B, P) from root noises and ``interventions`` (NaN = none)."""
        values = np.where(np.isnan(interventions), exo.u, interventions)
        if self.with_age:
            factor = np.exp(self.config.age_effect * (values[:, 0] - 60.0) / 20.0)[:, None]  # (B, 1)
            plaque = slice(1, 1 + 2 * len(self.schema.regions))  # cpa_*, ncpa_*
            pushed = exo.u[:, plaque] * factor
            values[:, plaque] = np.where(np.isnan(interventions[:, plaque]), pushed, interventions[:, plaque])
        return values

    def render(self, exo: geo.PhantomExogenous, values: np.ndarray, strict: bool = False) -> Rendered:
        """Render ``exo`` with variable ``values`` (B, P); ``strict`` raises where an area cannot fit."""
        parts = [self._render_chunk(exo.select(slice(s, s + CHUNK)), values[s : s + CHUNK], strict)
                 for s in range(0, len(exo), CHUNK)]  # fmt: skip
        return Rendered(*(np.concatenate([getattr(p, f) for p in parts]) for f in RENDERED))

    def _render_chunk(self, exo: geo.PhantomExogenous, values: np.ndarray, strict: bool) -> Rendered:
        areas = values[:, 1:] if self.with_age else values  # (B, 9): cpa, ncpa, la per third
        lay = geo.layout(geo.profiles(exo, self.grid), self.grid, areas)
        if strict and not lay.capacity_ok.all():
            b, v = np.argwhere(~lay.capacity_ok)[0]
            name = self.variables[v + int(self.with_age)]
            raise InterventionError(
                f"{name}={areas[b, v]:.3f} mm^2 does not fit this phantom image's geometry "
                f"(the structure would leave the {geo.FOV_H:g} mm field of view or close the lumen)"
            )
        fg, vessel = render.fractions(lay, self.grid)
        image = render.image(exo, self.grid, fg, vessel)
        parents = self._measure(render.soft_masks(fg))
        if self.with_age:
            parents = np.concatenate([values[:, :1].astype(np.float32), parents], axis=1)
        return Rendered(image, fg, parents, exo.pack())

    def _measure(self, masks: np.ndarray) -> np.ndarray:
        """Parents from masks with the one shared measurement: (B, 9) float32."""
        pixel_area = self.spacing_mm**2
        return self.schema.measure(torch.from_numpy(masks), self.regions[None], pixel_area).numpy()

    def render_indices(self, split: Split, indices: np.ndarray) -> Rendered:
        exo = self.exogenous_batch(split, indices)
        return self.render(exo, self.structural_values(exo, np.full(exo.u.shape, np.nan)))

    # -- data-source API -----------------------------------------------------------------------
    def split(self, name: Split) -> Dataset:
        if name not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {name!r}; expected train, val or test")
        return PhantomDataset(self, name)

    def _interventions_array(self, interventions: Sequence[Mapping[str, float]]) -> np.ndarray:
        out = np.full((len(interventions), len(self.variables)), np.nan)
        for i, do in enumerate(interventions):
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
        """True counterfactuals of images ``indices``: ``image`` (B,1,H,W), ``masks``, ``labels``, ``parents``.

        ``interventions[i]`` maps variable names to values (mm^2, years for age); descendants of an
        intervened variable follow the true mechanism; an area that cannot fit raises InterventionError.
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

    def _counterfactual(self, exo: geo.PhantomExogenous, interventions) -> dict[str, torch.Tensor]:
        values = self.structural_values(exo, self._interventions_array(interventions))
        r = self.render(exo, values, strict=True)
        masks = torch.from_numpy(render.soft_masks(r.fg))
        return {"image": torch.from_numpy(r.image), "masks": masks, "labels": masks.argmax(1),
                "parents": torch.from_numpy(r.parents)}  # fmt: skip


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
        return {
            "image": torch.from_numpy(r.image[0]),
            "masks": masks,
            "labels": masks.argmax(0),
            "parents": torch.from_numpy(r.parents[0]),
            "regions": self.source.regions,
            "index": torch.tensor(index, dtype=torch.int64),
            "exogenous": torch.from_numpy(r.exogenous[0]),
        }


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
