"""The run config: one frozen tree whose plugin sections are built from the registry.

A plugin section (``data``, ``regions``, ``flows``, ``image_mechanism``, the guidance terms of
every fine-tuning strategy and the evaluation metrics) is a discriminated union on ``name`` of the
config models that the registered plugins declare. An unknown ``name`` fails with the valid names
and a "did you mean"; a kind with no registered plugin fails with a message that says so.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from causalimg.config.sections import (
    ConstraintConfig,
    FinetuneTrainConfig,
    FlowsTrainConfig,
    MechanismFinetuneConfig,
    PluginsSection,
    PredictorsSection,
    ReportSection,
    RunSection,
    SamplingTimeConfig,
    TrackingConfig,
    TrainConfig,
)
from causalimg.errors import ConfigError, PluginError
from causalimg.plugins.manager import Registry
from causalimg.strict import StrictModel

# The component a section selects when the config leaves it out, if a plugin of that name is
# registered and its config needs no values; otherwise the section must be given.
DEFAULT_CHOICES: dict[str, str] = {
    "dataset": "phantom",
    "partitioner": "axial-thirds",
    "attribute_mechanism": "spline-flow",
    "image_mechanism": "hvae",
}

# Top-level sections that select one component, and the kind of component they select.
PLUGIN_SECTIONS: dict[str, str] = {
    "data": "dataset",
    "regions": "partitioner",
    "flows": "attribute_mechanism",
    "image_mechanism": "image_mechanism",
}

_LABEL = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _check_labels(labels: Mapping[str, Any], noun: str) -> None:
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(
                f"{noun} label {label!r} must be lower case letters, digits, '-' or '_' (it names a folder)"
            )


class PluginConfig(StrictModel):
    """What code may rely on in any plugin section: the ``name`` that selected the plugin.

    The static type of plugin sections; at run time a section is the selected plugin's own config model.
    """

    name: str


class FinetuneSection(StrictModel):
    """Counterfactual fine-tuning: one run per strategy label, each a weighted sum of guidance terms."""

    train: FinetuneTrainConfig = FinetuneTrainConfig()
    strategies: dict[str, list[PluginConfig]] = {"none": []}
    temperature: PositiveFloat = 0.1  # posterior noise scale of the abduction (0: posterior means)
    trainable: Literal["all", "decoder"] = "all"
    interventions_per_step: PositiveInt = 1
    constraint: ConstraintConfig = ConstraintConfig()
    # strategy labels whose terms guide the prediction at sampling time instead of fine-tuning
    sampling_time: dict[str, SamplingTimeConfig] = {}
    # image mechanisms (by run label) fine-tuned with their own `train` and `constraint`: mechanisms
    # differ in step cost and loss scale; what an entry leaves out comes from `train` and `constraint`
    per_mechanism: dict[str, MechanismFinetuneConfig] = {}

    @model_validator(mode="before")
    @classmethod
    def _per_mechanism_from_shared(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not isinstance(data.get("per_mechanism"), Mapping):
            return data
        shared = {key: _plain(data[key]) for key in MechanismFinetuneConfig.model_fields if key in data}
        entries = {label: _overlay(shared, entry) for label, entry in data["per_mechanism"].items()}
        return {**data, "per_mechanism": entries}

    @model_validator(mode="after")
    def _sampling_time_labels(self) -> FinetuneSection:
        for label in self.sampling_time:
            if not self.strategies.get(label):
                raise ValueError(
                    f"sampling_time: {label!r} must be a strategy label with guidance terms "
                    f"(strategies: {', '.join(self.strategies)})"
                )
        return self

    @field_validator("strategies")
    @classmethod
    def _labels(cls, strategies: dict[str, Any]) -> dict[str, Any]:
        _check_labels(strategies, "strategy")
        if not strategies:
            raise ValueError("give at least one strategy, for example `none: []` (no guidance)")
        return strategies


def _plain(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def _overlay(shared: Mapping[str, Any], entry: Any) -> Any:
    """A ``per_mechanism`` entry over the shared sections: its fields win, one level deep."""
    if not isinstance(entry, Mapping):
        return entry  # refused by validation, at the entry
    out = dict(entry)
    for key, value in shared.items():
        mine = _plain(entry.get(key))
        if key not in entry:
            out[key] = value
        elif isinstance(mine, Mapping) and isinstance(value, Mapping):
            out[key] = {**value, **mine}
    return out


class EvaluateSection(StrictModel):
    """Counterfactual evaluation (every registered metric by default)."""

    split: Literal["val", "test"] = "test"  # choose settings on val; evaluate test once per config
    num_images: PositiveInt = 256
    batch_size: PositiveInt = 32
    metrics: list[PluginConfig] = []


class RunConfig(StrictModel):
    """A causalimg run: data, causal mechanisms, predictors, fine-tuning, evaluation and report.

    The static shape of every run config; ``build_run_config_model`` subclasses it with the plugin
    sections of a registry.
    """

    run: RunSection = RunSection()
    plugins: PluginsSection = PluginsSection()
    data: PluginConfig
    regions: PluginConfig
    flows: PluginConfig
    image_mechanism: PluginConfig
    # further image mechanisms by label, each pretrained, fine-tuned with every strategy and evaluated
    # beside ``image_mechanism`` on the same data, flows and predictors (see ``mechanism_paths``)
    compare_mechanisms: dict[str, PluginConfig] = {}
    flows_train: FlowsTrainConfig = FlowsTrainConfig()
    pretrain: TrainConfig = TrainConfig()
    predictors: PredictorsSection = PredictorsSection()
    finetune: FinetuneSection = FinetuneSection()
    evaluate: EvaluateSection = EvaluateSection()
    report: ReportSection = ReportSection()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("compare_mechanisms")
    @classmethod
    def _mechanism_labels(cls, mechanisms: dict[str, Any]) -> dict[str, Any]:
        _check_labels(mechanisms, "mechanism")
        return mechanisms

    @model_validator(mode="after")
    def _main_mechanism_label(self) -> RunConfig:
        if self.image_mechanism.name in self.compare_mechanisms:
            raise ValueError(
                f"compare_mechanisms: the label {self.image_mechanism.name!r} is image_mechanism's own "
                "(its stages are labelled by its name); choose another label"
            )
        labels = mechanism_labels(self)
        unknown = [m for m in self.finetune.per_mechanism if m not in labels]
        if unknown:
            raise ValueError(
                f"finetune.per_mechanism: {', '.join(map(repr, unknown))} is not an image mechanism of this run "
                f"({', '.join(labels)})"
            )
        for strategy, guided in self.finetune.sampling_time.items():
            unknown = [m for m in guided.mechanisms or () if m not in labels]
            if unknown:
                raise ValueError(
                    f"finetune.sampling_time.{strategy}.mechanisms: {', '.join(map(repr, unknown))} is not an image "
                    f"mechanism of this run ({', '.join(labels)})"
                )
        return self


def mechanism_paths(config: Any) -> dict[str | None, str]:
    """Each image mechanism of a run: its stage label -> its config path.

    A run with one mechanism has the label None and the plain stage names (``pretrain``,
    ``finetune/<strategy>``); with ``compare_mechanisms`` every mechanism is labelled, the main
    one by its plugin name: ``pretrain/<mechanism>``, ``finetune/<mechanism>/<strategy>``.
    """
    extra = config.compare_mechanisms
    if not extra:
        return {None: "image_mechanism"}
    return {config.image_mechanism.name: "image_mechanism", **{label: f"compare_mechanisms.{label}" for label in extra}}


def mechanism_labels(config: Any) -> list[str]:
    """Every image mechanism's label, as ``finetune.sampling_time.<s>.mechanisms`` names them: the
    main one by its plugin name, the others by their ``compare_mechanisms`` labels."""
    return [label or config.image_mechanism.name for label in mechanism_paths(config)]


def finetune_entry(config: Any, mechanism: str | None) -> str | None:
    """The ``finetune.per_mechanism`` entry with which the image mechanism labelled ``mechanism``
    (None: the only one) is fine-tuned; None when it takes ``finetune.train`` and ``finetune.constraint``."""
    label = mechanism or config.image_mechanism.name
    return label if label in config.finetune.per_mechanism else None


def finetune_settings(config: Any, mechanism: str | None) -> Any:
    """The ``train`` and ``constraint`` with which that mechanism is fine-tuned."""
    entry = finetune_entry(config, mechanism)
    return config.finetune if entry is None else config.finetune.per_mechanism[entry]


def finetune_settings_path(config: Any, mechanism: str | None) -> str:
    """Where that mechanism's fine-tuning ``train`` and ``constraint`` are: what its finetune stages read."""
    entry = finetune_entry(config, mechanism)
    return "finetune" if entry is None else f"finetune.per_mechanism.{entry}"


def runs_on(config: Any, mechanism: str | None, strategy: str) -> bool:
    """Whether ``strategy`` is fine-tuned or applied on the image mechanism labelled ``mechanism``
    (None: the only one): every strategy is, but a sampling-time one that names its mechanisms."""
    guided = config.finetune.sampling_time.get(strategy)
    if guided is None or guided.mechanisms is None:
        return True
    return (mechanism or config.image_mechanism.name) in guided.mechanisms


def mechanism_of(config: Any, label: str) -> str:
    """The config path of the image mechanism behind a model label from ``strategy_labels``."""
    paths = mechanism_paths(config)
    mechanism = label.split("/", 1)[0] if "/" in label else None
    if mechanism not in paths:
        raise ConfigError(f"{label!r} is not a model of this run; its models: {', '.join(strategy_labels(config))}")
    return paths[mechanism]


def strategy_labels(config: Any) -> list[str]:
    """The run's evaluated models as the report and the API name them: ``<strategy>`` with one image
    mechanism, ``<mechanism>/<strategy>`` with several (mechanism-major order)."""
    return [
        strategy if mechanism is None else f"{mechanism}/{strategy}"
        for mechanism in mechanism_paths(config)
        for strategy in config.finetune.strategies
        if runs_on(config, mechanism, strategy)
    ]


def _plugin_name_check(registry: Registry, kind: str):
    """A validator run before the union: a clear message for an unknown or missing ``name``."""

    def check(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value
        if isinstance(value, str):  # shorthand: `regions: grid` means `regions: {name: grid}`
            value = {"name": value}
        names = registry.names(kind)
        if not names:
            raise PydanticCustomError(
                "no_plugins",
                "no {kind} plugins are registered (`causalimg plugins` lists what is loaded)",
                {"kind": kind},
            )
        if isinstance(value, Mapping):
            if "name" not in value:
                raise PydanticCustomError(
                    "plugin_name_missing",
                    "{kind} needs a 'name'; valid names: {names}",
                    {"kind": kind, "names": ", ".join(names)},
                )
            try:
                registry.get(kind, str(value["name"]))
            except ConfigError as err:
                raise PydanticCustomError("unknown_plugin", "{reason}", {"reason": str(err)}) from None
        return value

    return check


def _each_once(noun: str, advice: str) -> AfterValidator:
    """A list of components in which each name may appear once: a strategy sums its guidance terms
    and the evaluation keys its metrics by name, so a repeat is a mistake (fine-tuning refused it
    only after every earlier stage had run; a repeated metric silently replaced the first)."""

    def check(items: list[Any]) -> list[Any]:
        names = [getattr(item, "name", None) for item in items]
        repeated = [n for n in dict.fromkeys(names) if n is not None and names.count(n) > 1]
        if repeated:
            where = "; ".join(
                f"{str(n)!r} at {' and '.join(str(i) for i, m in enumerate(names) if m == n)}" for n in repeated
            )
            raise PydanticCustomError(
                "repeated_name",
                "{noun} appears more than once ({where}); {advice}",
                {"noun": noun, "where": where, "advice": advice},
            )
        return items

    return AfterValidator(check)


def plugin_union(registry: Registry, kind: str) -> Any:
    """The annotation of a section that selects one ``kind`` component by its ``name``."""
    configs = tuple(spec.config for spec in registry.specs(kind).values())
    check = BeforeValidator(_plugin_name_check(registry, kind))
    if not configs:
        return Annotated[Any, check]
    return Annotated[Union[configs], Field(discriminator="name"), check]  # noqa: UP007 (a runtime tuple of types)


def _default_config(registry: Registry, kind: str, name: str) -> BaseModel | None:
    spec = registry.specs(kind).get(name)
    if spec is None:
        return None
    try:
        return spec.config()
    except ValidationError:
        return None


def _plugin_field(registry: Registry, kind: str) -> tuple[Any, Any]:
    default = _default_config(registry, kind, DEFAULT_CHOICES.get(kind, ""))
    return plugin_union(registry, kind), (... if default is None else default)


def _check_guidance_weights(registry: Registry) -> None:
    for spec in registry.specs("guidance").values():
        field = spec.config.model_fields.get("weight")
        if field is None or field.is_required():
            raise PluginError(
                f"guidance {spec.name!r} of {spec.provider}: its config {spec.config.__name__} needs a "
                "field `weight: float = 1.0` (the term's weight in a fine-tuning strategy)"
            )


def _all_default_metrics(registry: Registry) -> list[BaseModel]:
    defaults = (_default_config(registry, "metric", name) for name in registry.names("metric"))
    return [config for config in defaults if config is not None]


@functools.lru_cache(maxsize=8)
def build_run_config_model(registry: Registry) -> type[RunConfig]:
    """The run config model for the components in ``registry`` (one class per registry)."""
    _check_guidance_weights(registry)
    guidance_term = plugin_union(registry, "guidance")
    metric = plugin_union(registry, "metric")
    # annotations built at run time from the registry: typed Any for the type checker
    terms: Any = Annotated[list[guidance_term], _each_once("guidance", "give each term once, with its weight")]  # type: ignore[valid-type]
    strategies: Any = dict[str, terms]
    metrics: Any = Annotated[list[metric], _each_once("metric", "give each metric once")]  # type: ignore[valid-type]
    mechanisms: Any = dict[str, plugin_union(registry, "image_mechanism")]  # type: ignore[misc]
    finetune = create_model(
        "FinetuneSection",
        __base__=FinetuneSection,
        __doc__=FinetuneSection.__doc__,
        strategies=(strategies, {"none": []}),
    )
    evaluate = create_model(
        "EvaluateSection",
        __base__=EvaluateSection,
        __doc__=EvaluateSection.__doc__,
        metrics=(metrics, Field(default_factory=lambda: _all_default_metrics(registry))),
    )
    sections: dict[str, Any] = {section: _plugin_field(registry, kind) for section, kind in PLUGIN_SECTIONS.items()}
    return create_model(
        "RunConfig",
        __base__=RunConfig,
        __doc__=RunConfig.__doc__,
        finetune=(finetune, finetune()),
        evaluate=(evaluate, Field(default_factory=evaluate)),
        compare_mechanisms=(mechanisms, {}),
        **sections,
    )


# The range of a 64-bit signed integer: every integer a config hands to torch or NumPy must fit.
INT64 = (-(2**63), 2**63 - 1)


def config_checks(config: BaseModel) -> list[InitErrorDetails]:
    """What the models' fields cannot check alone, run once a config validates: numbers that no
    tensor can hold (in any plugin's config, whatever its base class) and model names of libraries."""
    errors = list(_number_errors(config.model_dump(), ()))
    regressor = getattr(getattr(config, "predictors", None), "regressor", None)
    if regressor is not None:
        errors += _timm_errors(regressor.model, ("predictors", "regressor", "model"))
    return errors


def _number_errors(value: Any, loc: tuple[str | int, ...]) -> Any:
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        yield _error("finite_number", "Input should be a finite number", loc, value)
    elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        yield _error("int64", "Input should fit in a 64-bit integer (|value| < 2^63)", loc, value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _number_errors(item, (*loc, key))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for index, item in enumerate(value):
            yield from _number_errors(item, (*loc, index))


def _timm_errors(name: str, loc: tuple[str | int, ...]) -> list[InitErrorDetails]:
    """timm knows the name, or the message lists close matches (timm is imported only here: 3 s)."""
    import timm

    if timm.is_model(name):
        return []
    known = timm.list_models()
    close = difflib.get_close_matches(name[:100], known, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    message = f"not a timm model{hint} (`timm.list_models()` lists the {len(known)} names)"
    return [_error("unknown_model", message, loc, name)]


def _error(kind: str, message: str, loc: tuple[str | int, ...], value: Any) -> InitErrorDetails:
    """One error as pydantic reports it; the message is passed as context, never as a template."""
    return InitErrorDetails(type=PydanticCustomError(kind, "{message}", {"message": message}), loc=loc, input=value)
