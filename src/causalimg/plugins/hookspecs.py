"""The hook specifications of causalimg: the one place that says what a plugin can provide.

Every hook returns a list of typed records (see :mod:`causalimg.plugins.specs`). A plugin is a
module or object with functions decorated by :data:`causalimg.hookimpl` whose names match these.
"""

from __future__ import annotations

import pluggy

from causalimg.plugins.specs import (
    AttributeMechanismSpec,
    DatasetSpec,
    GuidanceSpec,
    ImageMechanismSpec,
    MetricSpec,
    PartitionerSpec,
)

hookspec = pluggy.HookspecMarker("causalimg")


@hookspec
def causalimg_image_mechanisms() -> list[ImageMechanismSpec]:
    """Image mechanisms x := g(z, pa_x), for example the hierarchical VAE.

    Example::

        @causalimg.hookimpl
        def causalimg_image_mechanisms():
            return [ImageMechanismSpec(name="hvae", config=HVAEConfig, factory=HVAE.from_config,
                                       summary="Top-down hierarchical VAE conditioned on parents")]
    """


@hookspec
def causalimg_attribute_mechanisms() -> list[AttributeMechanismSpec]:
    """Invertible mechanisms v_k := f_k(u_k; pa_k) for scalar attributes (normalizing flows).

    Example::

        @causalimg.hookimpl
        def causalimg_attribute_mechanisms():
            return [AttributeMechanismSpec(name="spline-flow", config=SplineFlowConfig,
                                           factory=SplineFlow.from_config,
                                           summary="Conditional neural spline flow")]
    """


@hookspec
def causalimg_guidance_strategies() -> list[GuidanceSpec]:
    """Guidance strategies for counterfactual fine-tuning (Reg-CFT, Seg-CFT, Pos-Seg-CFT, ...).

    Example::

        @causalimg.hookimpl
        def causalimg_guidance_strategies():
            return [GuidanceSpec(name="regressor", config=RegressorGuidanceConfig,
                                 factory=RegressorGuidance.from_config,
                                 summary="A frozen regressor predicts the targets from x~")]
    """


@hookspec
def causalimg_region_partitioners() -> list[PartitionerSpec]:
    """Region partitioners: named, disjoint masks that split an image into regions.

    Example::

        @causalimg.hookimpl
        def causalimg_region_partitioners():
            return [PartitionerSpec(name="axial-thirds", config=AxialThirdsConfig,
                                    factory=AxialPartitioner.from_config,
                                    summary="Proximal / mid / distal thirds along the vessel")]
    """


@hookspec
def causalimg_datasets() -> list[DatasetSpec]:
    """Data sets of images, label masks and regional parent measurements.

    Example::

        @causalimg.hookimpl
        def causalimg_datasets():
            return [DatasetSpec(name="phantom", config=PhantomConfig, factory=PhantomSource.from_config,
                                summary="Synthetic coronary sCPR with true counterfactuals")]
    """


@hookspec
def causalimg_metrics() -> list[MetricSpec]:
    """Counterfactual metrics (effectiveness, composition, reversibility, realism, ...).

    Example::

        @causalimg.hookimpl
        def causalimg_metrics():
            return [MetricSpec(name="effectiveness", config=EffectivenessConfig,
                               factory=Effectiveness.from_config,
                               summary="Per-region error of the evaluation segmentor on x~")]
    """
