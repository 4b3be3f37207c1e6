"""A job's search space against a plug-in objective's declared parameters (search/
objective_space.py), as created and as read back from the database by workers and by
extend/resume: the objective's own default ranges hold in both."""

from __future__ import annotations

import pytest
from optuna.distributions import FloatDistribution

from search import JobSpec
from search.objective_space import ParamError, check_space, distributions_for
from search.objectives import Objective, Param


class Declared(Objective):
    name = "declared"
    params = {"learning_rate": Param.real(1e-3, 1.0, log=True),
              "l1_ratio": Param.real(0.0, 1.0)}

    def train(self, trial, reporter):
        raise NotImplementedError


def _stored(spec: JobSpec) -> JobSpec:
    """The spec as a worker reads it back: every field set, the defaults too."""
    return JobSpec.model_validate(spec.model_dump(mode="json"))


def test_defaults_hold_after_the_round_trip():
    spec = JobSpec.model_validate({"objective": "declared"})
    for s in (spec, _stored(spec)):
        check_space(s, Declared())
        dists, fixed = distributions_for(s, Declared())
        assert dists == {"learning_rate": FloatDistribution(1e-3, 1.0, log=True),
                         "l1_ratio": FloatDistribution(0.0, 1.0)} and fixed == {}


def test_given_ranges_hold_after_the_round_trip():
    spec = JobSpec.model_validate({"objective": "declared", "search_space": {
        "learning_rate": {"low": 0.01, "high": 0.1},
        "extra": {"l1_ratio": {"kind": "fixed", "value": 0.5}}}})
    for s in (spec, _stored(spec)):
        check_space(s, Declared())
        dists, fixed = distributions_for(s, Declared())
        assert dists == {"learning_rate": FloatDistribution(0.01, 0.1)}
        assert fixed == {"l1_ratio": 0.5}


@pytest.mark.parametrize(("space", "field"), [
    ({"dropout": {"low": 0.0, "high": 0.2}}, "search_space.dropout"),
    ({"extra": {"depth": {"kind": "int", "low": 1, "high": 3}}}, "search_space.extra.depth"),
    ({"extra": {"l1_ratio": {"kind": "categorical", "choices": ["a", "b"]}}},
     "search_space.extra.l1_ratio"),
])
def test_undeclared_or_mistyped_dimensions_are_named(space, field):
    spec = JobSpec.model_validate({"objective": "declared", "search_space": space})
    for s in (spec, _stored(spec)):
        with pytest.raises(ParamError) as info:
            check_space(s, Declared())
        assert info.value.field == field


def test_first_trial_is_the_centre_of_the_declared_ranges():
    """The warm-start centre of a plug-in's job lies in its own ranges, not the built-in's
    (learning_rate's default range differs; l1_ratio is the plug-in's alone)."""
    from search.study import center_config

    spec = JobSpec.model_validate({"objective": "declared"})
    for s in (spec, _stored(spec)):
        centre = center_config(s, Declared())
        assert centre == pytest.approx({"learning_rate": (1e-3 * 1.0) ** 0.5, "l1_ratio": 0.5})
