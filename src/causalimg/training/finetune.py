"""Counterfactual fine-tuning (CFT): make the pretrained DSCM obey interventions it learnt to ignore.

One step on a factual batch (x, pa, regions):
  1. action: pick one area variable at random (``interventions_per_step`` distinct ones) and draw
     each image's target uniformly over the variable's observed range [low, high];
  2. pa~ = DSCM.counterfactual_parents(pa, do): descendants move through their flows;
  3. abduct z from (x, pa) at ``temperature``, decode x~ = g(z, pa~);
  4. guidance G = sum of the strategy's weighted terms on (x~, pa~, x, pa, regions);
  5. keep the factual objective N (the image mechanism's ``loss``, the HVAE's nelbo) from
     degrading, with slack s = eps - N:
       lagrangian:  loss = G - (lambda - damping * sg(s)) * s
                    lambda <- max(0, lambda - lagrange_lr * s)   (gradient ascent: dloss/dlambda = -s,
                    applied before the next batch)
       fixed:       loss = G + weight * N
     eps is the pretrained model's train-set objective (``measure_nelbo``, eval mode).

``CounterfactualFineTuning`` is the module the shared training loop (``training.loop.fit``)
trains: it holds the DSCM, the frozen guidance strategies and the multiplier lambda (a buffer, so
checkpoints and resumes keep it). Only the image mechanism trains (all of it, or every part but
its bottom-up ``encoder``); flows and predictors never do.

No-CFT (a strategy with no guidance terms) is the pretrained DSCM used as it is, the paper's
baseline: the finetune stage writes the pretrained weights and trains nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, cast

import torch
from torch import nn

from causalimg.core.guidance import GuidanceInputs, GuidanceStrategy
from causalimg.core.mechanism import Exogenous, HasEncoder, ImageMechanism, SharesEncoderPass
from causalimg.core.schema import VariableSchema
from causalimg.core.scm import DSCM
from causalimg.errors import ConfigError, DataError
from causalimg.predictors.frozen import freeze
from causalimg.training.distributed import mean_over_processes


def select_trainable(dscm: DSCM, trainable: Literal["all", "decoder"]) -> list[nn.Parameter]:
    """The image mechanism's parameters: all, or all outside its bottom-up ``encoder`` (g(z, pa))."""
    image = dscm.image
    if trainable == "all":
        return list(image.parameters())
    if not isinstance(image, HasEncoder) or not isinstance(image.encoder, nn.Module):
        raise ConfigError(
            f"finetune.trainable='decoder' needs an image mechanism with an `encoder` submodule; "
            f"{type(image).__name__} has none: use trainable='all'"
        )
    frozen = {id(p) for p in image.encoder.parameters()}
    return [p for p in image.parameters() if id(p) not in frozen]


@torch.no_grad()
def measure_nelbo(dscm: DSCM, batches: Iterable[Mapping[str, torch.Tensor]], max_batches: int | None = None) -> float:
    """Mean factual nelbo (nats per pixel) in eval mode: eps, the level fine-tuning must keep."""
    was_training = dscm.training
    dscm.eval()
    device = next(dscm.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, pa = batch["image"].to(device), batch["parents"].to(device)
        nelbo = dscm.image.loss(x, dscm.image_parents(dscm.transform.normalise(pa)))["loss"]  # (B,)
        total += float(nelbo.sum())
        count += nelbo.shape[0]
    dscm.train(was_training)
    if count == 0:
        raise DataError("cannot measure the pretrained nelbo: no training batches")
    return total / count


def factual_and_abducted(
    image: nn.Module, x: torch.Tensor, pa: torch.Tensor, t: float
) -> tuple[dict[str, torch.Tensor], Exogenous]:
    """The factual loss and the abducted state of x under normalised parents pa: from one encoder pass
    where the image mechanism ``SharesEncoderPass`` (the HVAE does), else from two calls."""
    if isinstance(image, SharesEncoderPass):
        return image.loss_and_abduct(x, pa, t)
    mechanism = cast(ImageMechanism, image)
    return mechanism.loss(x, pa), mechanism.abduct(x, pa, t)


class LagrangeMultiplier(nn.Module):
    """lambda >= 0 of the damped Lagrangian (Platt & Barr's MDMM); buffers, so checkpoints keep it.

    The ascent step for a batch's slack is applied at the start of the next training forward
    (``ascend``), so the loss of every step uses the same lambda sequence as updating right away,
    while the one collective that averages the slack over processes runs where all ranks are known
    to be in step (a rank that failed in the previous step has already stopped every rank).
    """

    value: torch.Tensor
    pending: torch.Tensor

    def __init__(self, lr: float, damping: float):
        super().__init__()
        self.lr, self.damping = lr, damping
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("pending", torch.full((), float("nan")))  # slack not yet applied; NaN: none

    def penalty(self, slack: torch.Tensor) -> torch.Tensor:
        """-(lambda - damping * sg(s)) * s for the slack s = eps - nelbo (a scalar)."""
        return -(self.value.to(slack) - self.damping * slack.detach()) * slack

    @torch.no_grad()
    def record(self, slack: torch.Tensor) -> None:
        self.pending.copy_(slack.detach())

    @torch.no_grad()
    def ascend(self) -> None:
        """lambda <- max(0, lambda - lr * s) with the recorded slack s averaged over processes.

        d loss / d lambda = -s, so this is gradient ascent: lambda grows while nelbo > eps. A
        non-finite slack (a skipped step, or nothing recorded) leaves lambda as it is.
        """
        slack = mean_over_processes(self.pending.float())
        if torch.isfinite(slack):
            self.value.sub_(self.lr * slack.to(self.value)).clamp_(min=0.0)
        self.pending.fill_(float("nan"))


class CounterfactualFineTuning(nn.Module):
    """The CFT step as the module the loop trains: ``forward(batch) -> {"loss", "guidance", ...}``.

    It holds the DSCM, the frozen strategies and the multiplier, so one ``state_dict`` (the loop's
    checkpoints) carries lambda with the weights. ``trainable`` lists what the optimiser may move.
    batch: ``image`` (B, 1, H, W), ``parents`` (B, P) data units and ``regions`` (B, K, H, W);
    without ``regions`` in the batch the fixed ``regions`` (1, K, H, W) given here are used.
    """

    def __init__(
        self,
        dscm: DSCM,
        strategies: Sequence[GuidanceStrategy],
        *,
        schema: VariableSchema,
        pixel_area_mm2: float,
        eps: float,
        regions: torch.Tensor | None = None,
        constraint: Literal["lagrangian", "fixed"] = "lagrangian",
        lagrange_lr: float = 0.05,
        damping: float = 10.0,
        nelbo_weight: float = 1.0,
        temperature: float = 0.1,
        interventions_per_step: int = 1,
        trainable: Literal["all", "decoder"] = "all",
    ):
        super().__init__()
        self.dscm = dscm
        self.strategies = nn.ModuleList(freeze(s) for s in strategies)  # predictors never train
        self.multiplier = LagrangeMultiplier(lagrange_lr, damping)
        self.trainable = select_trainable(dscm, trainable)
        self.fixed_regions = None if regions is None else regions.float()
        self.schema = schema
        self.pixel_area_mm2, self.eps, self.constraint = float(pixel_area_mm2), float(eps), constraint
        self.nelbo_weight, self.temperature = nelbo_weight, temperature
        if tuple(dscm.transform.names) != schema.names:
            raise ConfigError(
                f"the DSCM's variables {list(dscm.transform.names)} are not the data's {list(schema.names)}"
            )
        self.area_columns = list(schema.area_columns)
        if interventions_per_step > len(self.area_columns):
            raise ConfigError(
                f"finetune.interventions_per_step={interventions_per_step} exceeds the "
                f"{len(self.area_columns)} area variables"
            )
        self.interventions_per_step = interventions_per_step

    def train(self, mode: bool = True) -> CounterfactualFineTuning:
        """Train mode reaches the image mechanism; flows and predictors stay in eval mode."""
        super().train(mode)
        self.dscm.attributes.eval()
        for strategy in self.strategies:
            strategy.train(mode)  # a GuidanceStrategy keeps its predictors in eval mode
        return self

    def draw_intervention(self, parents: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """do(...) on random area variables, targets uniform over [low, high]; and the (B, P) mask.

        Uses the global torch generator, which the loop seeds per (seed, rank, step).
        """
        transform = self.dscm.transform
        batch = parents.shape[0]
        chosen = torch.randperm(len(self.area_columns))[: self.interventions_per_step].tolist()
        do: dict[str, torch.Tensor] = {}
        intervened = torch.zeros_like(parents, dtype=torch.bool)
        for k in chosen:
            col = self.area_columns[k]
            low, high = float(transform.low[col]), float(transform.high[col])
            do[transform.names[col]] = (low + torch.rand(batch) * (high - low)).clamp(low, high).to(parents)
            intervened[:, col] = True
        return do, intervened

    def _regions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "regions" in batch:
            return batch["regions"]
        if self.fixed_regions is None:
            raise DataError("fine-tuning needs region masks: a 'regions' entry in the batch or fixed regions")
        return self.fixed_regions.to(batch["image"].device)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, pa = batch["image"], batch["parents"]  # (B, 1, H, W), (B, P) mm^2
        dscm = self.dscm
        updating = self.constraint == "lagrangian" and self.training and torch.is_grad_enabled()
        if updating:
            self.multiplier.ascend()  # the previous batch's step, before anything here can fail
        factual, exogenous = factual_and_abducted(
            dscm.image, x, dscm.image_parents(dscm.transform.normalise(pa)), self.temperature
        )
        nelbo = factual["loss"].mean()
        slack = self.eps - nelbo  # > 0 while the factual fit is at least as good as pretrained

        do, intervened = self.draw_intervention(pa)  # as DSCM.counterfactual, with the state abducted above
        cf_parents = dscm.counterfactual_parents(pa, do)
        cf_image = dscm.image.predict(exogenous, dscm.image_parents(dscm.transform.normalise(cf_parents)))
        inputs = GuidanceInputs(
            cf_image=cf_image, cf_parents=cf_parents, image=x, parents=pa, intervened=intervened,
            regions=self._regions(batch), pixel_area_mm2=self.pixel_area_mm2, transform=dscm.transform,
            schema=self.schema,
        )  # fmt: skip
        terms: dict[str, torch.Tensor] = {}
        for strategy in self.strategies:
            terms.update({f"guidance/{k}": v for k, v in strategy(inputs).items()})
        guidance = sum(terms.values(), torch.zeros((), device=x.device))

        if self.constraint == "fixed":
            loss = guidance + self.nelbo_weight * nelbo
        else:
            loss = guidance + self.multiplier.penalty(slack)
            if updating:
                self.multiplier.record(slack)
        return {
            "loss": loss,
            "guidance": guidance.detach(),
            "nelbo": nelbo.detach(),
            "slack": slack.detach(),
            "lambda": self.multiplier.value.clone(),
            **{k: v.detach() for k, v in terms.items()},
        }
