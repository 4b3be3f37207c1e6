"""The training loop end to end: learning, stopping rules, determinism, tasks."""

import math

import numpy as np
import pytest

from trainer import TrainConfig, fit, from_arrays, load_dataset
from trainer.fit import DIVERGENCE_FACTOR, steps_per_epoch
from trainer.schedules import lr_at

CLASSIFICATION_KEYS = {
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "train_accuracy",
    "lr",
    "seconds",
}
REGRESSION_KEYS = {
    "epoch",
    "train_loss",
    "val_loss",
    "train_rmse",
    "val_rmse",
    "train_r2",
    "val_r2",
    "lr",
    "seconds",
}


def test_digits_reaches_95_percent(digits):
    cfg = TrainConfig(
        hidden_layers=(128, 64),
        optimizer="adam",
        learning_rate=2e-3,
        batch_size=32,
        max_epochs=15,
        monitor="val_accuracy",
        seed=0,
    )
    result = fit(cfg, digits)
    assert result.best_value >= 0.95
    assert result.test_metrics["accuracy"] >= 0.93
    assert result.stop_reason == "max_epochs"
    assert result.stopped_epoch == len(result.history) == 15
    assert set(result.history[0]) >= CLASSIFICATION_KEYS
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_mnist1d_reaches_its_mlp_range(mnist1d):
    cfg = TrainConfig(
        hidden_layers=(256, 256),
        optimizer="adamw",
        learning_rate=2e-3,
        batch_size=32,
        dropout=0.1,
        weight_decay=1e-4,
        max_epochs=16,
        monitor="val_accuracy",
    )
    result = fit(cfg, mnist1d)
    assert result.best_value >= 0.6
    assert result.test_metrics["accuracy"] >= 0.55


def test_absurd_learning_rate_diverges_within_the_epoch(digits):
    cfg = TrainConfig(optimizer="sgd", learning_rate=1e4, batch_size=32, max_epochs=10)
    result = fit(cfg, digits)
    assert result.stop_reason == "diverged"
    assert result.stopped_epoch == len(result.history) == 1
    bad = result.history[-1]["train_loss"]
    assert result.diverged_loss == bad
    assert not math.isfinite(bad) or bad > DIVERGENCE_FACTOR
    assert math.isnan(result.history[-1]["val_loss"])
    assert result.best_epoch is None and result.best_value is None


def test_divergence_after_good_epochs_restores_the_best_weights(digits):
    # An exponential schedule that *grows* 30x per epoch (an LR range test): sane first
    # epochs, then a blow-up.
    n = len(digits.X_train)
    cfg = TrainConfig(
        optimizer="sgd",
        learning_rate=1e-2,
        batch_size=64,
        max_epochs=20,
        schedule="exponential",
        gamma=30.0,
        hidden_layers=(32,),
    )
    result = fit(cfg, digits)
    assert result.stop_reason == "diverged", [h["train_loss"] for h in result.history]
    assert result.stopped_epoch > 1
    assert result.best_epoch is not None and result.best_epoch < result.stopped_epoch
    best = result.history[result.best_epoch - 1]
    assert best["val_loss"] == result.best_value
    # The restored weights are the best epoch's: validation loss reproduces exactly.
    val = result.network.evaluate(digits.X_val, digits.y_val)
    assert val["loss"] == best["val_loss"]
    assert math.isfinite(result.test_metrics["loss"])
    assert steps_per_epoch(cfg, n) == math.ceil(n / 64)


def test_early_stopping_restores_best_weights(digits):
    cfg = TrainConfig(
        hidden_layers=(64,), learning_rate=3e-2, batch_size=16, patience=2, max_epochs=60, seed=3
    )
    result = fit(cfg, digits)
    assert result.stop_reason == "early_stopped"
    assert result.stopped_epoch == result.best_epoch + 2
    losses = [h["val_loss"] for h in result.history]
    assert result.best_value == min(losses) == losses[result.best_epoch - 1]
    # Same seed, stopped right at the best epoch: identical weights, identical test metrics.
    again = fit(
        TrainConfig(
            hidden_layers=(64,),
            learning_rate=3e-2,
            batch_size=16,
            max_epochs=result.best_epoch,
            seed=3,
            restore_best=False,
        ),
        digits,
    )
    assert again.history == [
        {
            **h,
            "seconds": again.history[i]["seconds"],
            "train_seconds": again.history[i]["train_seconds"],
        }
        for i, h in enumerate(result.history[: result.best_epoch])
    ]
    assert again.test_metrics == result.test_metrics


def test_without_restore_best_keeps_the_last_weights(digits):
    cfg = TrainConfig(
        hidden_layers=(64,),
        learning_rate=3e-2,
        batch_size=16,
        patience=2,
        max_epochs=60,
        seed=3,
        restore_best=False,
    )
    result = fit(cfg, digits)
    val = result.network.evaluate(digits.X_val, digits.y_val)
    assert val["loss"] == result.history[-1]["val_loss"] != result.best_value


def test_min_delta_and_accuracy_monitor(digits):
    cfg = TrainConfig(
        hidden_layers=(32,), max_epochs=30, patience=3, min_delta=0.99, monitor="val_accuracy"
    )
    result = fit(cfg, digits)
    # No accuracy can beat the first epoch's by more than 0.99.
    assert result.stop_reason == "early_stopped"
    assert result.best_epoch == 1 and result.stopped_epoch == 4


def test_on_epoch_callback_prunes(digits):
    seen = []

    def callback(epoch, metrics):
        seen.append((epoch, dict(metrics)))
        return epoch == 3

    result = fit(TrainConfig(hidden_layers=(32,), max_epochs=10), digits, on_epoch=callback)
    assert result.stop_reason == "pruned"
    assert result.stopped_epoch == 3
    assert [e for e, _ in seen] == [1, 2, 3]
    assert seen[1][1] == result.history[1]


@pytest.mark.parametrize("batch_size", [16, 100, 512])
def test_on_examples_reports_at_the_same_marks_for_any_batch_size(digits, batch_size):
    n = len(digits.X_train)
    every = 300
    calls = []

    def callback(mark, metrics):
        calls.append((mark, dict(metrics)))

    cfg = TrainConfig(hidden_layers=(32,), batch_size=batch_size, max_epochs=3,
                      eval_every_examples=every)
    result = fit(cfg, digits, on_examples=callback)
    marks = [m for m, _ in calls]
    # Every multiple of 300 up to 3 epochs' examples, once each, whatever the batch size
    # (a batch of 512 may pass two marks at once: both are reported).
    assert marks == list(range(every, 3 * n + 1, every))
    for mark, metrics in calls:
        # Evaluated at the first batch boundary at or past the mark.
        assert mark <= metrics["examples"] < mark + batch_size
        assert set(metrics) == {"examples", "val_loss", "val_accuracy"}
        assert 0.0 <= metrics["val_accuracy"] <= 1.0
    assert result.examples_seen == 3 * n
    assert result.stop_reason == "max_epochs"
    # The metrics are of the weights at that moment: they change as training goes on.
    assert calls[0][1]["val_loss"] > calls[-1][1]["val_loss"]


def test_on_examples_at_an_epoch_end_reuses_the_epochs_evaluation(digits):
    n = len(digits.X_train)
    calls = []
    cfg = TrainConfig(hidden_layers=(16,), batch_size=n, max_epochs=2, eval_every_examples=n)
    result = fit(cfg, digits, on_examples=lambda m, metrics: calls.append((m, metrics)))
    assert [m for m, _ in calls] == [n, 2 * n]
    for (_, metrics), row in zip(calls, result.history, strict=True):
        assert metrics["val_loss"] == row["val_loss"]
        assert metrics["val_accuracy"] == row["val_accuracy"]


def test_on_examples_stops_mid_epoch(digits):
    n = len(digits.X_train)
    cfg = TrainConfig(hidden_layers=(32,), batch_size=32, max_epochs=5, eval_every_examples=200)
    marks = []

    def callback(mark, metrics):
        marks.append(mark)
        return mark >= n + 200  # a mark inside the second epoch

    result = fit(cfg, digits, on_examples=callback)
    assert result.stop_reason == "pruned"
    assert result.stopped_epoch == 2
    stop_mark = -(-(n + 200) // 200) * 200  # the first multiple of 200 from n + 200 on
    assert marks[-1] == stop_mark
    assert stop_mark <= result.examples_seen < stop_mark + 32
    last = result.history[-1]
    assert last["examples"] == result.examples_seen - n < n  # the partial epoch's rows
    assert set(CLASSIFICATION_KEYS) <= set(last)


def test_eval_every_examples_is_validated():
    with pytest.raises(ValueError, match="eval_every_examples"):
        TrainConfig(eval_every_examples=0)


def test_same_seed_gives_identical_history(digits):
    cfg = TrainConfig(
        hidden_layers=(64, 32),
        dropout=0.3,
        input_noise=0.1,
        batch_size=50,
        max_epochs=3,
        optimizer="adamw",
        weight_decay=1e-3,
        seed=7,
    )
    a, b = fit(cfg, digits), fit(cfg, digits)
    strip = [{k: v for k, v in h.items() if "seconds" not in k} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if "seconds" not in k} for h in b.history]
    np.testing.assert_array_equal(a.network.params, b.network.params)
    c = fit(TrainConfig(**{**cfg.to_dict(), "seed": 8}), digits)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


@pytest.mark.parametrize("batch_size", ["full", 1])
def test_extreme_batch_sizes(batch_size):
    data = load_dataset("iris", seed=0)
    cfg = TrainConfig(
        hidden_layers=(16,),
        batch_size=batch_size,
        max_epochs=3,
        learning_rate=0.05 if batch_size == "full" else 0.01,
    )
    result = fit(cfg, data)
    assert result.stop_reason == "max_epochs"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(math.isfinite(h["val_loss"]) for h in result.history)


def test_binary_breast_cancer_learns():
    data = load_dataset("breast_cancer", seed=0)
    assert data.task == "binary" and data.n_classes == 2
    result = fit(TrainConfig(hidden_layers=(32,), max_epochs=10, monitor="val_accuracy"), data)
    assert result.best_value >= 0.93
    assert result.test_metrics["accuracy"] >= 0.9
    assert set(result.test_metrics) == {"accuracy", "loss"}


def test_regression_learns():
    data = load_dataset("regression", seed=0)
    assert data.task == "regression" and data.y_train.dtype == np.float32
    cfg = TrainConfig(
        hidden_layers=(64, 64), learning_rate=3e-3, batch_size=32, max_epochs=25, monitor="val_r2"
    )
    result = fit(cfg, data)
    assert set(result.history[0]) >= REGRESSION_KEYS
    assert result.best_value > 0.8
    assert result.test_metrics["r2"] > 0.8
    assert set(result.test_metrics) == {"rmse", "r2", "loss"}
    assert result.test_metrics["rmse"] == pytest.approx(math.sqrt(result.test_metrics["loss"]))


def test_schedule_lr_recorded_per_epoch(digits):
    cfg = TrainConfig(
        hidden_layers=(16,), schedule="cosine", warmup_epochs=1, max_epochs=4, batch_size=100
    )
    result = fit(cfg, digits)
    spe = steps_per_epoch(cfg, len(digits.X_train))
    for h in result.history:
        assert h["lr"] == pytest.approx(lr_at(h["epoch"] * spe - 1, cfg, spe))


@pytest.mark.parametrize(
    "optimizer", ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad"]
)
def test_every_optimizer_learns(digits, optimizer):
    lr = {"sgd": 0.1, "momentum": 0.02, "nesterov": 0.02, "adagrad": 0.02}.get(optimizer, 2e-3)
    cfg = TrainConfig(
        hidden_layers=(32,),
        optimizer=optimizer,
        learning_rate=lr,
        batch_size=32,
        max_epochs=4,
        weight_decay=1e-4,
    )
    result = fit(cfg, digits)
    assert result.history[-1]["val_accuracy"] > 0.85, result.history[-1]


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "gelu"])
def test_every_activation_learns(digits, activation):
    cfg = TrainConfig(
        hidden_layers=(32,),
        activation=activation,
        learning_rate=3e-3,
        max_epochs=4,
        l2=1e-4,
        l1=1e-5,
        grad_clip=5.0,
    )
    assert fit(cfg, digits).history[-1]["val_accuracy"] > 0.85


def test_grad_clip_bounds_the_first_update(digits):
    # With SGD and a tiny clip the parameters move by at most lr * clip in the first step.
    from trainer.fit import build_network

    cfg = TrainConfig(
        hidden_layers=(16,),
        optimizer="sgd",
        learning_rate=1.0,
        grad_clip=1e-3,
        batch_size=len(digits.X_train),
        max_epochs=1,
    )
    start = build_network(cfg, digits).params.copy()
    end = fit(cfg, digits).network.params
    assert np.linalg.norm(end - start) == pytest.approx(1e-3, rel=1e-3)


def test_monitor_must_exist_for_the_task(digits):
    with pytest.raises(ValueError, match="val_r2"):
        fit(TrainConfig(monitor="val_r2"), digits)


def test_from_arrays_dataset_trains():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    data = from_arrays(X, y, seed=1, name="upload-1")
    result = fit(TrainConfig(hidden_layers=(16,), max_epochs=15, learning_rate=1e-2), data)
    assert result.test_metrics["accuracy"] > 0.85


def test_linear_model_and_float64(digits):
    result = fit(
        TrainConfig(hidden_layers=(), max_epochs=3, learning_rate=1e-2, dtype="float64"), digits
    )
    assert result.network.params.dtype == np.float64
    assert result.history[-1]["val_accuracy"] > 0.85


def test_result_to_dict_is_plain():
    import json

    data = load_dataset("iris", seed=0)
    result = fit(TrainConfig(hidden_layers=(8,), max_epochs=2), data)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["stopped_epoch"] == 2 and payload["stop_reason"] == "max_epochs"


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_masks_are_inverted_and_have_rate_p(p):
    from trainer.fit import _Dropout

    drop = _Dropout(p, (64, 32), 500, np.dtype(np.float32))
    drop.draw(np.random.default_rng(0), 500)
    masks = drop.masks(0, 500)
    assert [m.shape for m in masks] == [(64, 500), (32, 500)]
    values = np.concatenate([m.ravel() for m in masks])
    assert set(np.unique(values)) == {0.0, np.float32(drop.scale)}
    assert abs(np.mean(values == 0) - p) < 0.01
    assert abs(values.mean() - 1.0) < 0.03  # inverted dropout keeps the expectation


def test_dropout_is_off_at_evaluation(digits):
    cfg = TrainConfig(hidden_layers=(32,), dropout=0.5, max_epochs=2)
    result = fit(cfg, digits)
    net = result.network
    # Evaluation is deterministic (no masks) and matches the recorded validation loss.
    a = net.evaluate(digits.X_val, digits.y_val)
    b = net.evaluate(digits.X_val, digits.y_val)
    assert a == b
    assert a["loss"] == result.history[result.best_epoch - 1]["val_loss"]
