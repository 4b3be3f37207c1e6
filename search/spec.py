"""The job spec: what a user asks the service to tune, validated field by field."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from search.spec_dims import (
    MAX_CHOICES,
    MAX_LAYER_WIDTH,
    MAX_LAYERS,
    MAX_WARM_CONFIGS,
    MIN_REPORT_EVERY,
    PARAM_NAME,
    ExtraDim,
    Fixed,
    FixedBatchSize,
    FloatRange,
    IntChoices,
    IntRange,
    LayerWidths,
    StrChoices,
    _Strict,
)
from trainer.vocab import Activation, Direction, Metric, Optimizer, Schedule

# The four core dimensions every job searches unless the spec fixes them.
CORE_PARAMS = ("learning_rate", "batch_size", "dropout", "weight_decay")

# Search's own names, written once as the Literal types of SamplerSpec.name and
# PrunerSpec.name (the trainer's names are the StrEnums of trainer.vocab).
SamplerName = Literal["random", "tpe", "gp", "qmc", "cmaes"]
PrunerName = Literal["none", "median", "percentile", "successive_halving", "hyperband",
                     "threshold", "patient"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
PRUNERS: tuple[str, ...] = get_args(PrunerName)
OPTIMIZERS = tuple(Optimizer)
ACTIVATIONS = tuple(Activation)
METRICS = tuple(Metric)
SCHEDULES = tuple(Schedule)

# Control characters (Cc), format characters (Cf: bidi overrides and isolates, zero-width
# spaces and joiners, soft hyphens), lone surrogates (Cs), line and paragraph separators.
_NOT_IN_NAMES = ("Cc", "Cf", "Cs", "Zl", "Zp")


def control_character(text: str) -> str | None:
    """The first control or format character (NUL, newline, U+202E, ...) or lone surrogate in
    `text`, as U+XXXX.

    Names are one line of text that every database can store and that reads as it is:
    PostgreSQL refuses NUL in text, a lone surrogate cannot be encoded at all, and a bidi
    override or a zero-width character makes a name show as something it is not.
    """
    bad = next((c for c in text if unicodedata.category(c) in _NOT_IN_NAMES), None)
    return None if bad is None else f"U+{ord(bad):04X}"


def _plain_text(text: str) -> str:
    bad = control_character(text)
    if bad is not None:
        raise ValueError(f"must not contain control or format characters (found {bad})")
    return text


# A name field takes the plain string of an enum member ("relu"), in JSON and from Python
# dicts alike; the models below are strict, which for an enum would demand the member itself.
# A stored spec dumped with mode="json" keeps plain strings.
_Name = Strict(False)


class SearchSpace(_Strict):
    """Bounds of the four core dimensions; each may be fixed instead of searched."""

    learning_rate: FloatRange | Fixed = FloatRange(low=1e-4, high=0.3, log=True)
    batch_size: IntChoices | FixedBatchSize = IntChoices(choices=[16, 32, 64, 128, 256])
    dropout: FloatRange | Fixed = FloatRange(low=0.0, high=0.6)
    weight_decay: FloatRange | Fixed = FloatRange(low=1e-6, high=1e-2, log=True)
    # Optional dimensions; when absent the job's `model` fixes them. `momentum` is searched
    # only for the momentum optimizers, `width_<i>` only for the layers a trial has.
    optimizer: StrChoices | None = None
    momentum: FloatRange | None = None
    schedule: StrChoices | None = None
    activation: StrChoices | None = None
    n_layers: IntRange | None = Field(default=None, description="number of hidden layers")
    layer_width: LayerWidths | None = Field(default=None, description="width of each layer")
    # Parameters an objective other than the built-in `mlp` declares beyond the ones above
    # (checked against the objective's declaration when the job is created).
    extra: dict[Annotated[str, Field(pattern=PARAM_NAME)], ExtraDim] = Field(
        default={}, max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _check_names(self) -> SearchSpace:
        for name, known in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                            ("activation", ACTIVATIONS)):
            dim = getattr(self, name)
            bad = [c for c in dim.choices if c not in known] if dim else []
            if bad:
                raise ValueError(f"{name}.choices: unknown {bad}; known: {', '.join(known)}")
        if self.momentum and not (self.momentum.low >= 0 and self.momentum.high < 1):
            raise ValueError("momentum must lie in [0, 1)")
        if (self.n_layers is None) != (self.layer_width is None):
            raise ValueError("n_layers and layer_width are searched together")
        if self.n_layers and self.n_layers.high > MAX_LAYERS:
            raise ValueError(f"n_layers.high must be <= {MAX_LAYERS}")
        return self

    @model_validator(mode="after")
    def _check_values(self) -> SearchSpace:
        if isinstance(self.learning_rate, FloatRange) and self.learning_rate.low <= 0:
            raise ValueError("learning_rate.low must be > 0")
        if isinstance(self.learning_rate, Fixed) and self.learning_rate.value <= 0:
            raise ValueError("learning_rate.value must be > 0")
        if isinstance(self.batch_size, Fixed) and (
            self.batch_size.value < 1 or self.batch_size.value != int(self.batch_size.value)
        ):
            raise ValueError("batch_size.value must be a positive integer")
        for name in ("dropout",):
            dim = getattr(self, name)
            lo, hi = (dim.value, dim.value) if isinstance(dim, Fixed) else (dim.low, dim.high)
            if lo < 0 or hi >= 1:
                raise ValueError(f"{name} must lie in [0, 1)")
        wd = self.weight_decay
        if (wd.value if isinstance(wd, Fixed) else wd.low) < 0:
            raise ValueError("weight_decay must be >= 0")
        return self


class SamplerSpec(_Strict):
    """How the next configuration is chosen; every sampler is seedable."""

    name: SamplerName = "tpe"
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    # Random configurations before the model-based samplers take over.
    n_startup_trials: int = Field(default=8, ge=1, le=1000)


class PrunerSpec(_Strict):
    """When a trial is stopped for lagging behind its peers.

    Rungs (min_resource) and warm-up (n_warmup_steps) are counted in `resource`: epochs, or
    training examples seen, which puts trials with different batch sizes on equal compute and
    lets a pruner act within an epoch (metrics reported every `report_every` examples).
    """

    name: PrunerName = "successive_halving"
    resource: Literal["epochs", "examples"] = "epochs"
    # With resource "examples": report the metric every this many examples; None: at the end
    # of each epoch (at examples = epochs x training rows).
    # At least MIN_REPORT_EVERY: each report is a database write and a pruning check (and a
    # batch that passes several multiples reports once).
    report_every: int | None = Field(default=None, ge=MIN_REPORT_EVERY, le=2**31 - 1)
    # Successive halving and Hyperband: the first rung, and the keep-one-in-N factor.
    min_resource: int = Field(default=1, ge=1, le=2**31 - 1)
    reduction_factor: int = Field(default=3, ge=2, le=10)
    # Median and percentile: completed trials needed before pruning starts, epochs to wait.
    n_startup_trials: int = Field(default=5, ge=0, le=10_000)
    n_warmup_steps: int = Field(default=2, ge=0, le=2**31 - 1)
    # Percentile: keep the trials above this percentile at each epoch.
    percentile: float = Field(default=25.0, gt=0, lt=100)
    # Threshold: prune when the metric leaves [lower, upper].
    lower: float | None = None
    upper: float | None = None
    # Patient: wait this many epochs without improvement before asking `wrapped`.
    patience: int = Field(default=2, ge=0, le=10_000)
    min_delta: float = Field(default=0.0, ge=0)
    wrapped: PrunerSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> PrunerSpec:
        if self.name == "threshold":
            if self.lower is None and self.upper is None:
                raise ValueError("threshold pruner needs lower or upper")
            if self.lower is not None and self.upper is not None and self.lower > self.upper:
                raise ValueError("lower must be <= upper")
        if self.report_every is not None and self.resource != "examples":
            raise ValueError('report_every needs resource "examples"')
        if self.wrapped is not None:
            if self.wrapped.resource != "epochs" or self.wrapped.report_every is not None:
                raise ValueError("set resource and report_every on the outer (patient) pruner")
            if self.name != "patient":
                raise ValueError("only the patient pruner wraps another pruner")
            if self.wrapped.name == "patient":
                raise ValueError("a patient pruner cannot wrap another patient pruner")
        return self


class WarmStartSpec(_Strict):
    """Configurations to evaluate first: given here, or the best trials of an earlier job.

    Without either, the first trial evaluates the centre of the search space (`center`):
    the geometric middle of log ranges, the middle of linear ones, the middle choice.
    """

    configs: list[dict[str, float]] = Field(default=[], max_length=MAX_WARM_CONFIGS)
    from_job: int | None = Field(default=None, ge=1, le=2**31 - 1)
    top_k: int = Field(default=5, ge=1, le=100)
    center: bool = True

    @field_validator("configs")
    @classmethod
    def _known_params(cls, v: list[dict[str, float]]) -> list[dict[str, float]]:
        for i, cfg in enumerate(v):
            unknown = set(cfg) - set(CORE_PARAMS)
            if unknown:
                raise ValueError(f"configs[{i}] has unknown parameter(s) {sorted(unknown)}")
        return v


class EarlyStoppingSpec(_Strict):
    patience: int | None = Field(default=None, ge=1, le=10_000)
    min_delta: float = Field(default=0.0, ge=0.0)


class ModelSpec(_Strict):
    hidden_layers: list[Annotated[int, Field(ge=1, le=MAX_LAYER_WIDTH)]] = Field(
        default=[128, 64], max_length=MAX_LAYERS
    )
    activation: Annotated[Activation, _Name] = Activation.RELU
    optimizer: Annotated[Optimizer, _Name] = Optimizer.ADAM
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    schedule: Annotated[Schedule, _Name] = Schedule.CONSTANT
    # Linear warm-up in epochs before the schedule (combines with any schedule).
    warmup_epochs: float = Field(default=0.0, ge=0.0, le=100.0)


class JobSpec(_Strict):
    """A tuning job as submitted over REST or from a JSON file."""

    name: Annotated[str, AfterValidator(_plain_text)] = Field(default="job", min_length=1,
                                                              max_length=200)
    # What a trial trains: the built-in NumPy MLP, or an installed objective's name
    # (search.objectives; checked against what is installed when the job is created).
    objective: Annotated[str, Field(pattern=PARAM_NAME)] = "mlp"
    # Epochs between two checkpoints of a running trial (each pruning rung takes one too);
    # a retried trial resumes from its trial chain's latest checkpoint.
    checkpoint_every: int = Field(default=5, ge=1, le=1_000)
    # A bundled dataset name or the id of an uploaded one.
    dataset: Annotated[str, Field(max_length=200)] | Annotated[int, Field(ge=1, le=2**31 - 1)] = (
        "digits")
    n_trials: int = Field(default=20, ge=1, le=10_000)
    max_epochs: int = Field(default=30, ge=1, le=1_000)
    metric: Annotated[Metric, _Name] = Metric.VAL_ACCURACY
    search_space: SearchSpace = SearchSpace()
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    model: ModelSpec = ModelSpec()
    warm_start: WarmStartSpec = WarmStartSpec()
    # Share of would-be-pruned trials that train on to max_epochs anyway, so the report can
    # tell how often the pruner threw away a winner. Audited trials never count as best.
    audit_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # None: the service's HPTUNE_DEFAULT_TIMEOUT_SECONDS, written into the stored spec.
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    @field_validator("dataset")
    @classmethod
    def _dataset_not_blank(cls, v: str | int) -> str | int:
        if isinstance(v, str) and not v.strip():
            raise ValueError("dataset must not be empty")
        return v

    @model_validator(mode="after")
    def _warm_configs_in_space(self) -> JobSpec:
        for i, cfg in enumerate(self.warm_start.configs):
            for name, value in cfg.items():
                if not in_space(self.search_space, name, value):
                    raise ValueError(f"warm_start.configs[{i}].{name}={value} lies outside the "
                                     "search space")
        return self

    @property
    def direction(self) -> Direction:
        """`maximize` for accuracy and R^2, `minimize` for losses."""
        return self.metric.direction


def in_space(space: SearchSpace, name: str, value: float) -> bool:
    """Whether `value` is a point the search space's dimension `name` can take."""
    dim = getattr(space, name, None)
    if dim is None:
        return False
    if isinstance(dim, Fixed):
        return value == dim.value
    if isinstance(dim, IntChoices):
        return value in dim.choices
    return dim.low <= value <= dim.high


def metric_direction(metric: str) -> Direction:
    """The optimisation direction of a validation metric (Metric.direction, for a name)."""
    return Metric(metric).direction
