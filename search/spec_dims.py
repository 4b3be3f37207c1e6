"""The dimension types of a job spec's search space, and the bounds every list and width
keeps (search.spec builds the job spec from them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds on what one job may ask of a worker (README, "The job spec"): every list has a
# length, every width a ceiling, so that a trial's size is known before it runs.
MAX_CHOICES = 32  # items of a categorical dimension's `choices`
MAX_LAYERS = 8  # hidden layers (model.hidden_layers, search_space.n_layers.high)
MAX_LAYER_WIDTH = 4096  # units of one hidden layer
MAX_BATCH_SIZE = 65_536  # rows of one mini-batch
MIN_REPORT_EVERY = 100  # examples between two reports (pruner.report_every)
MAX_WARM_CONFIGS = 100  # warm_start.configs


class _Strict(BaseModel):
    # Unknown fields are a typo the user wants to hear about, not silently drop.
    # Strict: "5" is not a number and true is not a seed; say so rather than guess.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class FloatRange(_Strict):
    """A continuous dimension: uniform, or log-uniform when `log` is true."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check_bounds(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError("low must be <= high")
        if self.log and self.low <= 0:
            raise ValueError("low must be > 0 on a log scale")
        return self


class IntChoices(_Strict):
    """A categorical dimension over integers (batch sizes, layer widths)."""

    choices: list[Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)]] = Field(
        min_length=1, max_length=MAX_CHOICES)

    @field_validator("choices")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("choices must not repeat")
        return v


class LayerWidths(IntChoices):
    """Widths a hidden layer may take."""

    choices: list[Annotated[int, Field(gt=0, le=MAX_LAYER_WIDTH)]] = Field(
        min_length=1, max_length=MAX_CHOICES)


class StrChoices(_Strict):
    """A categorical dimension over names (optimizers, schedules, activations)."""

    choices: list[Annotated[str, Field(max_length=50)]] = Field(min_length=1,
                                                               max_length=MAX_CHOICES)

    @field_validator("choices")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("choices must not repeat")
        return v


class IntRange(_Strict):
    """An integer dimension from low to high inclusive."""

    low: int = Field(ge=1, le=4096)
    high: int = Field(ge=1, le=4096)

    @model_validator(mode="after")
    def _check_bounds(self) -> IntRange:
        if self.low > self.high:
            raise ValueError("low must be <= high")
        return self


class Fixed(_Strict):
    """A dimension held at one value."""

    value: float


class FixedBatchSize(Fixed):
    """A batch size held at one value."""

    value: float = Field(ge=1, le=MAX_BATCH_SIZE)


# A parameter name an objective declares: a Python identifier, short.
PARAM_NAME = r"^[a-z][a-z0-9_]{0,49}$"


class ExtraFloat(FloatRange):
    """A continuous extra dimension (`kind` tells it apart from the others in JSON)."""

    kind: Literal["float"] = "float"


class ExtraInt(IntRange):
    kind: Literal["int"] = "int"


class ExtraChoices(_Strict):
    """A categorical extra dimension over names or numbers."""

    kind: Literal["categorical"] = "categorical"
    choices: list[Annotated[str, Field(max_length=50)] | float] = Field(
        min_length=1, max_length=MAX_CHOICES)


class ExtraFixed(_Strict):
    kind: Literal["fixed"] = "fixed"
    value: Annotated[str, Field(max_length=50)] | float


ExtraDim = Annotated[ExtraFloat | ExtraInt | ExtraChoices | ExtraFixed,
                     Field(discriminator="kind")]
