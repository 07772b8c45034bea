"""``causalimg counterfactual``: one intervention applied to image files (or a split of the run's data).

Writes into ``--out``:
  images/<stem>.npz|.png    each counterfactual in its input's format and units, with the evaluation
                            segmentor's mask of it and the input's metadata
  differences/<stem>.png    x, x~ and x~ - x stacked (4x size, blue-white-red, regions dashed)
  contact_sheet.png         the first images side by side with titles and one colour scale
  areas.json, areas.csv     asked versus measured area of every structure in every region, per image,
                            and the Table 1 style summary (intervened region, off-target regions)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from causalimg.api.images import ImageFile, Reader, find_inputs
from causalimg.api.interventions import parse_assignments
from causalimg.api.model import CounterfactualModel, CounterfactualResult
from causalimg.api.pictures import contact_sheet, difference_limit, png_bytes, rgb_difference, rgb_grey, to_255
from causalimg.core.schema import VariableSchema
from causalimg.errors import DataError
from causalimg.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from causalimg.metrics.base import mean_ci

SHEET_IMAGES = 12  # images on the contact sheet
DIFF_SCALE = 4  # pixel size of the difference PNGs


@dataclass
class Item:
    """One image to intervene on: from a file (``file``) or from the run's data (``parents``)."""

    label: str
    image: torch.Tensor  # (H, W) in [-1, 1]
    masks: torch.Tensor | None  # (C, H, W) class fractions
    metadata: dict[str, Any]
    file: ImageFile | None = None
    parents: torch.Tensor | None = None  # (P,) the data set's own parents


@dataclass
class Collected:
    """What the summary and the contact sheet need, gathered batch by batch."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[torch.Tensor] = field(default_factory=list)  # (B, V) |measured - asked|
    changes: list[torch.Tensor] = field(default_factory=list)  # (B, V) |measured x~ - measured x|
    sheet: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def file_items(paths: Sequence[Path], reader: Reader) -> Iterator[Item]:
    for path in paths:
        f = reader.read(path)
        yield Item(path.name, f.image, f.masks, f.metadata, file=f)


def split_items(model: CounterfactualModel, split: str, limit: int | None) -> tuple[int, Iterator[Item]]:
    """The first ``limit`` images of a split of the run's own data, with the data set's parents."""
    from causalimg.core.data import split_size

    data = model.data_source().split(split)  # type: ignore[arg-type]
    n = split_size(data) if limit is None else min(limit, split_size(data))

    def items() -> Iterator[Item]:
        for i in range(n):
            item = data[i]
            meta = dict(data.metadata(i)) if hasattr(data, "metadata") else {}
            meta.pop("source", None)
            yield Item(f"{split}-{i:05d}.npz", item["image"][0], item["masks"], meta, parents=item["parents"])

    return n, items()


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_batch(
    model: CounterfactualModel, batch: list[Item], do: Mapping[str, Any], *, clamp: bool, seed: int
) -> list[tuple[list[int], CounterfactualResult]]:
    """Counterfactuals of one batch, in groups by where the factual parents come from."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(batch):
        groups.setdefault(
            "parents" if item.parents is not None else "masks" if item.masks is not None else "none", []
        ).append(i)
    out = []
    for how, members in groups.items():
        images = torch.stack([batch[i].image for i in members])
        regions = model.regions([batch[i].metadata | {"source": batch[i].label} for i in members])
        kwargs: dict[str, Any] = {}
        if how == "parents":
            kwargs["parents"] = torch.stack([batch[i].parents for i in members])  # type: ignore[misc]
        elif how == "masks":
            kwargs["masks"] = torch.stack([batch[i].masks for i in members])  # type: ignore[misc]
        try:
            result = model.counterfactual(images, do, regions=regions, clamp=clamp, seed=seed, **kwargs)
        except DataError as err:
            raise DataError(
                f"{', '.join(batch[i].label for i in members[:3])}{'...' if len(members) > 3 else ''}: {err}"
            ) from None
        out.append((members, result))
    return out


def apply(
    model: CounterfactualModel,
    items: Iterator[Item],
    total: int,
    assignments: Sequence[str],
    out: Path,
    *,
    reader: Reader,
    clamp: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Intervene on every item, write every output; returns the summary written to areas.json."""
    intervention = parse_assignments(assignments, model.names)
    for folder in ("images", "differences"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    collected = Collected()
    description = ""
    with tqdm(total=total, desc="counterfactuals", unit="img", disable=not progress) as bar:
        for batch in _batches(items, batch_size):
            for members, result in run_batch(model, batch, intervention, clamp=clamp, seed=seed):
                description = result.intervention
                _write(model, reader, [batch[i] for i in members], result, out, collected)
            bar.update(len(batch))
    if not collected.rows:
        raise DataError("no images to intervene on")
    summary = summarise(model.schema, intervention, collected)
    record = {
        "model": {
            "path": str(model.files.root),
            "kind": model.files.kind,
            "strategy": model.strategy,
            "temperature": model.temperature,
        },
        "intervention": description,
        "seed": seed,
        "clamp": clamp,
        "images": len({r["image"] for r in collected.rows}),
        "summary": summary,
        "rows": collected.rows,
    }
    atomic_write_json(out / "areas.json", record)
    atomic_write_text(out / "areas.csv", _csv(collected.rows))
    labels, xs, cfs, regions = zip(*collected.sheet)
    contact_sheet(
        torch.stack(xs),
        torch.stack(cfs),
        torch.stack(regions),
        labels,
        f"{description}: {model.strategy}; x, x~ and x~ - x (regions dashed)",
        out / "contact_sheet.png",
    )
    return record


def _write(
    model: CounterfactualModel,
    reader: Reader,
    items: list[Item],
    result: CounterfactualResult,
    out: Path,
    collected: Collected,
) -> None:
    classes = result.masks.argmax(1)  # (B, H, W) the evaluation segmentor's labels of x~
    errors, changes = result.errors(), (result.measured - result.measured_factual).abs()
    collected.errors.append(errors)
    collected.changes.append(changes)
    rows = result.rows([item.label for item in items])
    for i, item in enumerate(items):
        regions = result.regions[i if result.regions.shape[0] > 1 else 0]
        provenance = {
            "intervention": result.intervention,
            "strategy": model.strategy,
            "source": item.label,
            "model": str(model.files.root),
        }
        meta = {**item.metadata, "counterfactual": json.dumps(provenance)}
        if item.file is not None:
            reader.write_like(item.file, out / "images", result.images[i, 0], classes[i], meta)
        else:
            synthetic = ImageFile(Path(item.label), item.image, None, {}, 0)
            reader.write_like(synthetic, out / "images", result.images[i, 0], classes[i], meta)
        diff = to_255(result.images[i]) - to_255(result.factual_images[i])
        limit = difference_limit([diff])
        picture = np.concatenate(
            [
                rgb_grey(result.factual_images[i], DIFF_SCALE),
                rgb_grey(result.images[i], DIFF_SCALE),
                rgb_difference(diff, regions, limit, DIFF_SCALE),
            ],
            axis=0,
        )
        atomic_write_bytes(out / "differences" / f"{Path(item.label).stem}.png", png_bytes(picture))
        for row in rows[i * len(model.schema.areas) : (i + 1) * len(model.schema.areas)]:
            row["difference_limit_255"] = limit
        if len(collected.sheet) < SHEET_IMAGES:
            collected.sheet.append((item.label, result.factual_images[i], result.images[i], regions))
    collected.rows.extend(rows)


def summarise(schema: VariableSchema, intervention: Mapping[str, Any], collected: Collected) -> dict[str, Any]:
    """Table 1's two numbers for this intervention, per intervened variable, plus per-variable changes.

    intervened: |measured - asked| of the intervened variable; off_target: the same for the other
    regions of its structure (asked = factual there, unless a descendant moved); off_target_change:
    |measured on x~ - measured on x| there, the change the segmentor sees, free of its own bias.
    """
    errors, changes = torch.cat(collected.errors), torch.cat(collected.changes)  # (N, V)
    areas = schema.area_names
    out: dict[str, Any] = {"intervened": {}, "off_target": {}, "off_target_change": {}}
    for name in intervention:
        if name not in areas:
            continue
        v = areas.index(name)
        others = [i for i in schema.same_structure(v) if i != v]
        out["intervened"][name] = mean_ci(errors[:, v])
        if others:
            out["off_target"][name] = mean_ci(errors[:, others].mean(1))
            out["off_target_change"][name] = mean_ci(changes[:, others].mean(1))
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def counterfactual_command(
    run: str,
    strategy: str | None,
    input_path: str | None,
    split: str | None,
    limit: int | None,
    assignments: Sequence[str],
    out: str,
    *,
    clamp: bool,
    seed: int,
    batch_size: int,
    device: str,
    check_versions: bool,
) -> int:
    model = CounterfactualModel.from_pretrained(run, strategy, device, check_versions=check_versions)
    parse_assignments(assignments, model.names)  # a bad --do is reported before any file is read
    reader = Reader(model.schema, model.image_shape, model.inputs)
    if input_path is not None:
        paths = find_inputs(input_path)[:limit]
        total, items = len(paths), file_items(paths, reader)
    else:
        assert split is not None
        total, items = split_items(model, split, limit)
    record = apply(
        model, items, total, assignments, Path(out), reader=reader, clamp=clamp, seed=seed, batch_size=batch_size
    )
    for name, cell in record["summary"]["intervened"].items():
        off = record["summary"]["off_target"].get(name, {}).get("mean", float("nan"))
        print(
            f"{name}: intervened-region error {cell['mean']:.2f}, off-target {off:.2f} (mean over {cell['n']} images)"
        )
    print(f"wrote {record['images']} counterfactuals to {out}")
    return 0
