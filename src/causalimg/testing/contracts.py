"""Contract checks for plugin authors: call these from your tests on your partitioner or data source.

Each check raises ``AssertionError`` with a message naming what broke; it returns nothing on success.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch

from causalimg.core.data import DataSource, TrueCounterfactuals, split_size
from causalimg.core.mechanism import AttributeMechanism, GuidedPrediction, HasEncoder, ImageMechanism, Reconstructs
from causalimg.core.regions import Partitioner


def check_partitioner(
    partitioner: Partitioner,
    height: int = 32,
    width: int = 192,
    spacing_mm: float = 0.5,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Masks are (K, H, W) float32 CPU tensors in {0, 1}, disjoint, covering, deterministic; names unique."""
    names = tuple(partitioner.region_names)
    assert names and len(set(names)) == len(names), f"region_names must be unique and non-empty: {names}"
    masks = partitioner.masks(height, width, spacing_mm, metadata)
    assert isinstance(masks, torch.Tensor), f"masks must be a torch.Tensor, got {type(masks).__name__}"
    assert masks.shape == (len(names), height, width), (
        f"masks shape {tuple(masks.shape)} != {(len(names), height, width)}"
    )
    assert masks.dtype == torch.float32, f"masks dtype {masks.dtype} != torch.float32"
    assert masks.device.type == "cpu", f"masks built from sizes must be on the CPU, got {masks.device}"
    assert bool(((masks == 0) | (masks == 1)).all()), "masks must hold only 0 and 1"
    cover = masks.sum(0)
    assert bool((cover <= 1).all()), "regions overlap: some pixel is in two regions"
    assert bool((cover >= 1).all()), "regions do not cover the image: some pixel is in no region"
    again = partitioner.masks(height, width, spacing_mm, metadata)
    assert torch.equal(masks, again), "masks differ between two identical calls"


def check_data_source(source: DataSource, split: str = "train", n: int = 4) -> None:
    """Items of ``source.split(split)`` have the documented keys, shapes, dtypes and ranges, and their
    area parents equal ``schema.measure(masks, regions)``."""
    assert isinstance(source, DataSource), f"{type(source).__name__} does not implement DataSource"
    schema = source.schema
    h, w = source.image_shape
    k, c = len(schema.regions), schema.num_classes
    data = source.split(split)  # type: ignore[arg-type]
    assert split_size(data) > 0, f"split {split!r} is empty"
    for i in range(min(n, split_size(data))):
        item = data[i]
        for key in ("image", "masks", "labels", "parents", "regions", "index"):
            assert key in item, f"item {i} lacks {key!r}"
        img, masks, labels, parents, regions = (item[key] for key in ("image", "masks", "labels", "parents", "regions"))
        assert img.shape == (1, h, w) and img.dtype == torch.float32, f"image {tuple(img.shape)} {img.dtype}"
        assert bool(torch.isfinite(img).all()) and img.min() >= -1 and img.max() <= 1, (
            "image must be finite, in [-1, 1]"
        )
        assert masks.shape == (c, h, w) and masks.dtype == torch.float32, f"masks {tuple(masks.shape)} != {(c, h, w)}"
        assert bool((masks >= 0).all()) and torch.allclose(masks.sum(0), torch.ones(h, w), atol=1e-5), (
            "masks must be fractions summing to 1 per pixel"
        )
        assert labels.shape == (h, w) and labels.dtype == torch.int64, f"labels {tuple(labels.shape)} {labels.dtype}"
        assert bool((labels >= 0).all() and (labels < c).all()), f"labels outside 0..{c - 1}"
        assert parents.shape == (len(schema.names),) and parents.dtype == torch.float32, (
            f"parents {tuple(parents.shape)} {parents.dtype}"
        )
        assert regions.shape == (k, h, w), f"regions {tuple(regions.shape)} != {(k, h, w)}"
        assert int(item["index"]) == i, f"item {i} has index {int(item['index'])}"
        measured = schema.measure(masks[None], regions[None], source.spacing_mm**2)[0]
        given = parents[list(schema.area_columns)]
        assert torch.allclose(given, measured, rtol=1e-5, atol=1e-4), (
            f"item {i}: parents {given.tolist()} != schema.measure(masks, regions) {measured.tolist()}"
        )


def check_image_mechanism(
    mechanism: torch.nn.Module,
    image_shape: tuple[int, int],
    num_parents: int,
    batch: int = 2,
    abduction_tolerance: float = 1e-4,
) -> None:
    """The ImageMechanism contract, and every optional capability the mechanism declares.

    ``loss`` returns per-image (B,) finite tensors, ``loss`` among them; eval-mode abduction at
    temperature 0 is deterministic; ``predict`` and ``sample`` return (B, 1, H, W) float32 in
    [-1, 1] on the parameters' device; predicting under the factual parents gives back x within
    ``abduction_tolerance`` (exact pixel-noise abduction: 1e-4; an ODE inversion states its own).
    ``HasEncoder``: the encoder is a submodule with parameters; ``Reconstructs``: a (B, 1, H, W)
    image in [-1, 1]; ``GuidedPrediction``: with a loss that does not depend on the image it is
    ``predict``, and it returns no gradient.
    """
    model = cast(ImageMechanism, mechanism)
    h, w = image_shape
    device = next(mechanism.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 1, h, w, generator=gen) * 2 - 1).to(device)
    pa = (torch.rand(batch, num_parents, generator=gen) * 2 - 1).to(device)
    mechanism.eval()
    with torch.no_grad():
        out = model.loss(x, pa)
        assert "loss" in out, f"loss() must return the training objective under 'loss'; got {sorted(out)}"
        for key, value in out.items():
            assert value.shape == (batch,), f"loss()[{key!r}] shape {tuple(value.shape)} != ({batch},)"
            assert bool(torch.isfinite(value).all()), f"loss()[{key!r}] is not finite"
        exo = model.abduct(x, pa, t=0.0)
        again = model.abduct(x, pa, t=0.0)
        assert torch.equal(model.predict(exo, pa), model.predict(again, pa)), (
            "abduct() at t=0 in eval mode must be deterministic"
        )
        for image, name in ((model.predict(exo, pa), "predict"), (model.sample(pa, t=1.0), "sample")):
            assert image.shape == (batch, 1, h, w), f"{name}() shape {tuple(image.shape)} != {(batch, 1, h, w)}"
            assert image.dtype == torch.float32, f"{name}() dtype {image.dtype} != torch.float32"
            assert image.device == device, f"{name}() returned {image.device}, parameters are on {device}"
            assert float(image.min()) >= -1 and float(image.max()) <= 1, f"{name}() leaves [-1, 1]"
        error = float((model.predict(exo, pa) - x).abs().max())
        assert error < abduction_tolerance, (
            f"predict(abduct(x, pa), pa) must give back x within {abduction_tolerance:g}; max error {error:.2e}"
        )
        if isinstance(mechanism, HasEncoder):
            assert isinstance(mechanism.encoder, torch.nn.Module) and any(
                True for _ in mechanism.encoder.parameters()
            ), "a declared `encoder` must be a submodule with parameters"
        if isinstance(mechanism, Reconstructs):
            seen = mechanism.reconstruct(x, pa)
            assert seen.shape == x.shape and float(seen.min()) >= -1 and float(seen.max()) <= 1, (
                f"reconstruct() must give (B, 1, H, W) in [-1, 1], got {tuple(seen.shape)}"
            )
    if isinstance(mechanism, GuidedPrediction):  # needs gradients: outside no_grad
        steered = mechanism.predict_guided(exo, pa, lambda image: image.sum() * 0.0, scale=1.0)
        with torch.no_grad():
            plain = model.predict(exo, pa)
        assert not steered.requires_grad, "predict_guided() must return an image without a gradient"
        error = float((steered - plain).abs().max())
        assert error < 1e-5, f"predict_guided() with a flat loss must be predict(); max difference {error:.2e}"


def capabilities(component: object) -> set[str]:
    """The optional capabilities a mechanism or data source declares (what stages can use)."""
    protocols = {
        "HasEncoder": HasEncoder,
        "Reconstructs": Reconstructs,
        "GuidedPrediction": GuidedPrediction,
        "TrueCounterfactuals": TrueCounterfactuals,
    }
    return {name for name, protocol in protocols.items() if isinstance(component, protocol)}


def check_attribute_mechanism(mechanism: torch.nn.Module, num_context: int, batch: int = 64) -> None:
    """The AttributeMechanism contract: inverse_map undoes forward_map, (B, 1) values, (B,) log_prob."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
    context = torch.randn(batch, num_context, generator=gen, dtype=torch.float64) if num_context else None
    mechanism = mechanism.double().eval()
    model = cast(AttributeMechanism, mechanism)
    with torch.no_grad():
        v = model.forward_map(u, context)
        assert v.shape == (batch, 1), f"forward_map() shape {tuple(v.shape)} != ({batch}, 1)"
        back = model.inverse_map(v, context)
        assert back.shape == (batch, 1), f"inverse_map() shape {tuple(back.shape)} != ({batch}, 1)"
        error = float((back - u).abs().max())
        assert error < 1e-5, f"inverse_map(forward_map(u)) must give back u; max error {error:.2e}"
        log_prob = model.log_prob(v, context)
        assert log_prob.shape == (batch,), f"log_prob() shape {tuple(log_prob.shape)} != ({batch},)"
        assert bool(torch.isfinite(log_prob).all()), "log_prob() is not finite"
