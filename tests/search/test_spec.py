import json

import pytest
from pydantic import ValidationError

from search import JobSpec, metric_direction
from search.spec import METRICS, OPTIMIZERS
from search.study import distributions, fixed_params, train_config
from trainer import Metric, Optimizer


def _fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"] if not str(p)[:1].isupper()) for e in exc.errors()}


def test_defaults_match_the_design_spec():
    spec = JobSpec()
    assert spec.dataset == "digits"
    assert spec.direction == "maximize"
    assert set(distributions(spec)) == {"learning_rate", "batch_size", "dropout", "weight_decay"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n_trials": 0}, "n_trials"),
        ({"max_epochs": -1}, "max_epochs"),
        ({"bogus": 1}, "bogus"),
        ({"search_space": {"learning_rate": {"low": 0.5, "high": 0.1}}},
         "search_space.learning_rate"),
        ({"search_space": {"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}},
         "search_space.weight_decay"),
        ({"search_space": {"batch_size": {"choices": []}}}, "search_space.batch_size"),
        ({"search_space": {"batch_size": {"choices": [32, 32]}}}, "search_space.batch_size"),
        ({"search_space": {"batch_size": {"choices": [0, 32]}}}, "search_space.batch_size"),
        ({"sampler": {"name": "grid"}}, "sampler.name"),
        ({"pruner": {"name": "magic"}}, "pruner.name"),
        ({"model": {"optimizer": "lbfgs"}}, "model.optimizer"),
        ({"search_space": {"dropout": {"low": 0.0, "high": float("nan")}}}, "search_space.dropout"),
        ({"search_space": {"dropout": {"low": "-inf", "high": 0.5}}}, "search_space.dropout"),
    ],
)
def test_bad_specs_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert any(f.startswith(field) for f in _fields(info.value)), _fields(info.value)


def test_fixed_dimensions_are_not_searched_but_reach_the_trainer():
    spec = JobSpec.model_validate({"search_space": {"batch_size": {"value": 32},
                                                    "dropout": {"value": 0.1}}})
    assert "batch_size" not in distributions(spec)
    assert fixed_params(spec) == {"batch_size": 32, "dropout": 0.1}
    cfg = train_config(spec, {"learning_rate": 0.01, "weight_decay": 1e-4})
    assert cfg.batch_size == 32 and cfg.dropout == 0.1 and cfg.learning_rate == 0.01
    assert cfg.monitor == "val_accuracy" and cfg.patience == spec.early_stopping.patience


def test_names_are_the_trainers_and_stay_plain_strings_in_json():
    raw = {"metric": "val_r2", "dataset": "regression",
           "model": {"activation": "tanh", "optimizer": "sgd", "schedule": "cosine"}}
    spec = JobSpec.model_validate(raw)
    assert spec.metric is Metric.VAL_R2 and spec.direction == "maximize"
    assert spec.model.optimizer is Optimizer.SGD
    dumped = spec.model_dump(mode="json")
    assert type(dumped["metric"]) is str and type(dumped["model"]["activation"]) is str
    assert JobSpec.model_validate_json(json.dumps(dumped)) == spec
    assert tuple(Optimizer) == OPTIMIZERS and tuple(Metric) == METRICS
    assert metric_direction("val_loss") == "minimize"
    with pytest.raises(ValidationError):
        JobSpec.model_validate({"model": {"activation": "swish"}})
