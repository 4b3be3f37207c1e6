"""Bounds that keep one job's trials a known size: list lengths, widths, report rates, names."""

import optuna
import pytest
from pydantic import ValidationError

from search import JobSpec, create_study, load_study, run_trial
from search.datasets import bundled
from search.memory import (
    bundled_shape,
    largest_batch_size,
    largest_hidden_layers,
    largest_trial_memory,
    memory_field,
)
from search.spec import control_character
from search.spec_dims import MAX_BATCH_SIZE, MAX_CHOICES, MAX_LAYER_WIDTH, MIN_REPORT_EVERY

EXAMPLES = {"name": "successive_halving", "resource": "examples"}
LAYERS = {"n_layers": {"low": 1, "high": 2}}


def _fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"] if not str(p)[:1].isupper()) for e in exc.errors()}


HOSTILE = [
    ({"search_space": {**LAYERS, "layer_width": {"choices": [10**9]}}},
     "search_space.layer_width"),
    ({"search_space": {**LAYERS, "layer_width": {"choices": [MAX_LAYER_WIDTH + 1]}}},
     "search_space.layer_width"),
    ({"search_space": {**LAYERS, "layer_width": {"choices": list(range(1, 50_001))}}},
     "search_space.layer_width"),
    ({"search_space": {"batch_size": {"choices": list(range(1, 50_001))}}},
     "search_space.batch_size"),
    ({"search_space": {"batch_size": {"choices": list(range(1, MAX_CHOICES + 2))}}},
     "search_space.batch_size"),
    ({"search_space": {"batch_size": {"choices": [MAX_BATCH_SIZE + 1]}}},
     "search_space.batch_size"),
    ({"search_space": {"batch_size": {"value": 10**9}}}, "search_space.batch_size"),
    ({"search_space": {"optimizer": {"choices": ["adam"] * 50_000}}},
     "search_space.optimizer"),
    ({"model": {"hidden_layers": [8] * 9}}, "model.hidden_layers"),
    ({"model": {"hidden_layers": [MAX_LAYER_WIDTH + 1]}}, "model.hidden_layers"),
    ({"pruner": {**EXAMPLES, "report_every": 1}}, "pruner.report_every"),
    ({"pruner": {**EXAMPLES, "report_every": MIN_REPORT_EVERY - 1}}, "pruner.report_every"),
    ({"pruner": {"name": "median", "n_startup_trials": 10**12}}, "pruner.n_startup_trials"),
    ({"early_stopping": {"patience": 10**12}}, "early_stopping.patience"),
    ({"warm_start": {"configs": [{"learning_rate": 0.01}] * 101}}, "warm_start.configs"),
    ({"dataset": "d" * 201}, "dataset"),
    ({"dataset": 0}, "dataset"),
    ({"dataset": 2**40}, "dataset"),
    ({"name": "invoice\u202egpj.exe"}, "name"),  # RIGHT-TO-LEFT OVERRIDE
    ({"name": "a\u2066b\u2069"}, "name"),  # LEFT-TO-RIGHT ISOLATE ... POP DIRECTIONAL ISOLATE
    ({"name": "zero\u200bwidth"}, "name"),
    ({"name": "\ufeffbom"}, "name"),
    ({"name": "line\u2028separator"}, "name"),
]


@pytest.mark.parametrize(("body", "field"), HOSTILE, ids=[f for _, f in HOSTILE])
def test_hostile_values_are_refused_naming_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert any(f.startswith(field) for f in _fields(info.value)), _fields(info.value)


def test_values_at_the_bounds_are_accepted():
    spec = JobSpec.model_validate({
        "name": "Ünïcødé 名前 🚀 ok",
        "search_space": {"batch_size": {"choices": [*range(1, MAX_CHOICES), MAX_BATCH_SIZE]},
                         "n_layers": {"low": 1, "high": 8},
                         "layer_width": {"choices": [1, MAX_LAYER_WIDTH]}},
        "pruner": {**EXAMPLES, "report_every": MIN_REPORT_EVERY},
        "model": {"hidden_layers": [MAX_LAYER_WIDTH] * 8},
    })
    assert len(spec.search_space.batch_size.choices) == MAX_CHOICES
    assert JobSpec.model_validate(
        {"search_space": {"batch_size": {"value": MAX_BATCH_SIZE}}}).search_space.batch_size
    # The bounds survive a round trip through the stored JSON.
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(("text", "found"), [
    ("plain", None), ("tab\there", "U+0009"), ("rtl\u202eoverride", "U+202E"),
    ("\u2067isolate", "U+2067"), ("zwj\u200dhere", "U+200D"), ("soft\u00adhyphen", "U+00AD"),
    ("para\u2029sep", "U+2029"), ("accents é and CJK 日本", None),
])
def test_control_character_names_control_and_format_characters(text, found):
    assert control_character(text) == found


def test_largest_trial_is_the_widest_the_space_allows():
    searched = JobSpec.model_validate({"search_space": {
        "n_layers": {"low": 1, "high": 3}, "layer_width": {"choices": [16, 512, 64]},
        "batch_size": {"choices": [32, 1024, 128]},
        "optimizer": {"choices": ["sgd", "adam"]}}})
    assert largest_hidden_layers(searched) == (512, 512, 512)
    assert largest_batch_size(searched) == 1024
    fixed = JobSpec.model_validate({"model": {"hidden_layers": [64, 32]},
                                    "search_space": {"batch_size": {"value": 48}}})
    assert largest_hidden_layers(fixed) == (64, 32) and largest_batch_size(fixed) == 48
    # Of the optimizers it may draw, the one with state (adam) counts.
    adam_only = JobSpec.model_validate({"search_space": {
        **searched.model_dump(mode="json")["search_space"], "optimizer": {"choices": ["adam"]}}})
    shape = bundled_shape("digits")
    assert (largest_trial_memory(searched, *shape).total
            == largest_trial_memory(adam_only, *shape).total)
    wide = JobSpec.model_validate({"model": {"hidden_layers": [4096] * 8}})
    assert memory_field(wide, largest_trial_memory(wide, *shape)) == "model.hidden_layers"
    deep = JobSpec.model_validate({"search_space": {"n_layers": {"low": 1, "high": 8},
                                                    "layer_width": {"choices": [4096]}}})
    assert memory_field(deep, largest_trial_memory(deep, *shape)) == "search_space.layer_width"
    batchy = JobSpec.model_validate({"dataset": "mnist1d", "model": {"hidden_layers": [4096]},
                                     "search_space": {"batch_size": {"choices": [4096]}}})
    estimate = largest_trial_memory(batchy, *bundled_shape("mnist1d"))
    assert memory_field(batchy, estimate) == "search_space.batch_size"
    # Binary tasks have one output unit.
    assert bundled_shape("breast_cancer") == (569, 30, 1)


def test_a_batch_reports_at_most_once(tmp_path):
    # report_every 100 with batches of 512 rows: every batch passes five multiples of 100, and
    # reports once, at the last of them.
    spec = JobSpec.model_validate({
        "dataset": "digits", "n_trials": 1, "max_epochs": 2,
        "search_space": {"batch_size": {"value": 512}},
        "sampler": {"name": "random", "seed": 0}, "pruner": {**EXAMPLES, "report_every": 100},
        "model": {"hidden_layers": [8]}})
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    create_study(spec, storage, "job-1", {"job_id": 1})
    data = bundled("digits", 0)
    run_trial(load_study(spec, storage, "job-1"), spec, data)
    trial = optuna.load_study(study_name="job-1", storage=storage).trials[0]
    steps = sorted(trial.intermediate_values)
    n_train = len(data.X_train)
    seen = 0
    expected = []  # the last multiple of 100 each batch passed
    for _epoch in range(2):
        for start in range(0, n_train, 512):
            before, seen = seen, seen + min(512, n_train - start)
            if seen // 100 > before // 100:
                expected.append(seen // 100 * 100)
    assert steps == expected
    assert len(steps) <= 2 * -(-n_train // 512)
