"""A job's search space against its objective's declared parameters: the checks at job
creation and the Optuna distributions a trial is asked with.

The built-in `mlp` takes the spec's search space as it always has (search.study). Another
objective searches exactly the parameters it declares: a core dimension of the spec
(learning_rate, batch_size, dropout, weight_decay) or an MLP option (optimizer, momentum,
schedule, activation, n_layers, layer_width) set in the spec must be one it declares, an
`extra` dimension must be declared and of the declared kind, and a declared parameter the
spec leaves out is searched over the objective's default range.
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search.objectives import DEFAULT_OBJECTIVE, Objective, Param
from search.spec import CORE_PARAMS, JobSpec, SearchSpace
from search.spec_dims import (
    ExtraChoices,
    ExtraFixed,
    ExtraFloat,
    ExtraInt,
    Fixed,
    FloatRange,
    IntChoices,
    IntRange,
    StrChoices,
)

# Options of the built-in MLP that a spec's search space may set.
MLP_OPTIONS = ("optimizer", "momentum", "schedule", "activation", "n_layers", "layer_width")


class ParamError(ValueError):
    """A search-space dimension that does not fit the objective; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _kind_of(dim: Any) -> str:
    if isinstance(dim, Fixed | ExtraFixed):
        return "fixed"
    if isinstance(dim, FloatRange | ExtraFloat):
        return "float"
    if isinstance(dim, IntRange | ExtraInt):
        return "int"
    if isinstance(dim, IntChoices | StrChoices | ExtraChoices):
        return "categorical"
    raise TypeError(type(dim).__name__)


def _fits(param: Param, dim: Any) -> bool:
    kind = _kind_of(dim)
    if kind == "fixed" or kind == param.kind:
        return True
    # Integer choices (batch sizes) suit an int parameter too.
    return param.kind == "int" and isinstance(dim, IntChoices)


def _given(space: SearchSpace, name: str) -> bool:
    """Whether the spec sets core dimension or MLP option `name`.

    A spec read back from the database (the worker's, an extended job's) has every field set,
    the defaults too; a core dimension at SearchSpace's default (the built-in's range) counts
    as not given, so the objective's own default range applies in the worker as it did when
    the job was created.
    """
    if name not in space.model_fields_set or getattr(space, name) is None:
        return False
    return name not in CORE_PARAMS or getattr(space, name) != SearchSpace.model_fields[
        name].default


def check_space(spec: JobSpec, objective: Objective) -> None:
    """ParamError naming the first dimension of `spec` that `objective` does not take."""
    space = spec.search_space
    if objective.name == DEFAULT_OBJECTIVE:
        if space.extra:
            name = next(iter(space.extra))
            raise ParamError(f"search_space.extra.{name}",
                             f"objective 'mlp' has no parameter {name!r}")
        return
    declared = objective.params
    given = {n: getattr(space, n) for n in (*CORE_PARAMS, *MLP_OPTIONS) if _given(space, n)}
    given.update({n: d for n, d in space.extra.items()})
    for name, dim in given.items():
        where = f"search_space.extra.{name}" if name in space.extra else f"search_space.{name}"
        if name not in declared:
            raise ParamError(where, f"objective {objective.name!r} has no parameter {name!r}; "
                                    f"it takes {', '.join(declared) or 'none'}")
        if not _fits(declared[name], dim):
            raise ParamError(where, f"parameter {name!r} of objective {objective.name!r} is "
                                    f"{declared[name].kind}, not {_kind_of(dim)}")
    if spec.pruner.resource == "examples" and not objective.reports_examples:
        raise ParamError("pruner.resource", f"objective {objective.name!r} reports per "
                                            "epoch; use resource 'epochs'")


def _dim_for(spec: JobSpec, name: str) -> Any:
    space = spec.search_space
    if name in space.extra:
        return space.extra[name]
    if name in (*CORE_PARAMS, *MLP_OPTIONS) and _given(space, name):
        return getattr(space, name)
    return None


def distributions_for(spec: JobSpec, objective: Objective
                      ) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """The searched parameters of a non-built-in objective as Optuna distributions, and the
    fixed ones with their values."""
    dists: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for name, param in objective.params.items():
        dim = _dim_for(spec, name)
        if isinstance(dim, Fixed | ExtraFixed):
            fixed[name] = dim.value
        elif isinstance(dim, FloatRange | ExtraFloat):
            dists[name] = FloatDistribution(dim.low, dim.high, log=dim.log)
        elif isinstance(dim, IntRange | ExtraInt):
            dists[name] = IntDistribution(dim.low, dim.high)
        elif isinstance(dim, IntChoices | StrChoices | ExtraChoices):
            dists[name] = CategoricalDistribution(list(dim.choices))
        else:
            dists[name] = _default_distribution(param)
    return dists, fixed


def _default_distribution(param: Param) -> BaseDistribution:
    if param.kind == "float":
        return FloatDistribution(float(param.low), float(param.high), log=param.log)
    if param.kind == "int":
        return IntDistribution(int(param.low), int(param.high))
    return CategoricalDistribution(list(param.choices))
