"""Report pictures rendered from real studies in a real SQLite file."""

import io
import math
import struct

import matplotlib.colors as mcolors
import matplotlib.image as mpimg
import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from search.plots import PLOTS, param_importances, render_figure, render_png, render_pngs

DISTS = {
    "learning_rate": FloatDistribution(1e-4, 0.3, log=True),
    "batch_size": CategoricalDistribution([16, 32, 64, 128, 256]),
    "dropout": FloatDistribution(0.0, 0.6),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}
MAX_EPOCHS = 12

# Outcome colours the learning curves must show (search.plots' palette).
OUTCOME_COLOURS = {"max_epochs": "#0072B2", "early_stopped": "#009E73",
                   "pruned": "#E69F00", "diverged": "#D55E00"}


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A 20-trial study of every outcome, shared read-only by the tests of this module."""
    path = tmp_path_factory.mktemp("plots") / "s.db"
    return _mixed(optuna.storages.RDBStorage(f"sqlite:///{path}"))


def _study(storage, name="job-1", direction="maximize", metric="val_accuracy"):
    study = optuna.create_study(storage=storage, study_name=name, direction=direction)
    study.set_user_attr("spec", {"metric": metric, "max_epochs": MAX_EPOCHS})
    return study


def _params(i):
    return {"learning_rate": 10 ** (-4 + (i * 0.37) % 3),
            "batch_size": [16, 32, 64, 128, 256][i % 5],
            "dropout": (i * 0.13) % 0.6, "weight_decay": 10 ** (-6 + (i * 0.71) % 4)}


def _curve(i, epochs, ceiling):
    return {e: ceiling * (1 - math.exp(-0.35 * e)) + 0.002 * ((i + e) % 3) for e in
            range(1, epochs + 1)}


def _add(study, i, reason, epochs, ceiling=0.9, params=None, extra=None):
    """One finished trial carrying the user attributes search.runner.run_trial records."""
    params = params if params is not None else _params(i)
    dists = {k: DISTS[k] for k in params}
    iv = _curve(i, epochs, ceiling) if reason != "diverged" else {
        e: 0.1 + 0.01 * e for e in range(1, epochs + 1)}
    best_epoch = max(iv, key=iv.get) if iv else None
    attrs = {"stop_reason": reason, "stopped_epoch": epochs, "best_epoch": best_epoch,
             "epoch_seconds": 0.5, "train_seconds": 0.5 * epochs,
             "best_value": iv[best_epoch] if iv else None,
             "curves": {"val_accuracy": list(iv.values()), "train_loss": [None] * len(iv)}}
    state = TrialState.PRUNED
    value = None
    if reason in ("max_epochs", "early_stopped"):
        state, value = TrialState.COMPLETE, iv[best_epoch]
        attrs.update(test_accuracy=value - 0.01, test_loss=0.4)
        if reason == "early_stopped":
            attrs.update(patience=3, min_delta=0.0)
    elif reason == "pruned":
        attrs.update(pruner="hyperband", prune_step=epochs, prune_value=iv[epochs],
                     prune_cutoff=iv[epochs] + 0.05, prune_n_peers=5, prune_rung=1)
    elif reason == "diverged":
        attrs.update(diverged_epoch=epochs + 1, diverged_loss="nan", stopped_epoch=epochs + 1)
    elif reason in ("failed", "cancelled"):
        state = TrialState.FAIL
        attrs["error"] = "RuntimeError: boom"
    attrs.update(extra or {})
    study.add_trial(optuna.create_trial(state=state, value=value, params=params,
                                        distributions=dists, user_attrs=attrs,
                                        intermediate_values=iv))


def _mixed(storage, n=20, **kw):
    study = _study(storage, **kw)
    cycle = ["max_epochs", "pruned", "early_stopped", "pruned", "max_epochs", "diverged",
             "pruned", "early_stopped", "failed", "pruned"]
    for i in range(n):
        reason = cycle[i % len(cycle)]
        epochs = {"max_epochs": MAX_EPOCHS, "early_stopped": 8, "pruned": 1 + i % 4,
                  "diverged": 2, "failed": 1}[reason]
        _add(study, i, reason, epochs, ceiling=0.7 + 0.25 * ((i * 7) % 10) / 10)
    return study


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def _decode(png: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(png), format="png")


@pytest.mark.parametrize("name", PLOTS)
# At 403 x 600 and 458 x 777, px / dpi * dpi falls short of px in floating point.
@pytest.mark.parametrize(("w", "h"), [(1000, 600), (333, 229), (403, 600), (458, 777)])
def test_each_plot_is_a_png_of_exactly_the_requested_size(mixed, name, w, h):
    png = render_png(mixed, name, w, h)
    assert _png_size(png) == (w, h)
    assert _decode(png).shape[:2] == (h, w)


def test_default_size_is_1000_by_600(mixed):
    assert _png_size(render_png(mixed, "history")) == (1000, 600)


def test_unknown_plot_name_is_refused_by_name(mixed):
    with pytest.raises(ValueError, match="'pie_chart'"):
        render_png(mixed, "pie_chart")
    with pytest.raises(ValueError, match="'nope'"):
        render_pngs(mixed, ["history", "nope"])


@pytest.mark.parametrize(("w", "h", "arg"), [(199, 600, "width_px"), (1000, 4001, "height_px"),
                                             (0, 600, "width_px"), (1000.5, 600, "width_px"),
                                             (True, 600, "width_px")])
def test_sizes_out_of_bounds_are_refused(storage, w, h, arg):
    with pytest.raises(ValueError, match=arg):
        render_png(_study(storage), "history", w, h)


def test_extreme_but_valid_sizes_render(mixed):
    for w, h in [(200, 200), (4000, 200), (200, 4000)]:
        assert _png_size(render_png(mixed, "learning_curves", w, h)) == (w, h)


def test_empty_study_renders_every_plot(storage):
    study = _study(storage)
    pngs = render_pngs(study)
    assert set(pngs) == set(PLOTS)
    for png in pngs.values():
        assert _png_size(png) == (1000, 600)
        img = _decode(png)
        # Not a blank canvas: the "no trials yet" message is drawn.
        assert (img[..., :3] < 0.5).any()


def test_study_with_only_running_trials_renders(storage):
    study = _study(storage)
    trial = study.ask(DISTS)
    trial.report(0.3, 1)
    trial.report(0.5, 2)
    for name in PLOTS:
        assert _png_size(render_png(study, name)) == (1000, 600)


def test_learning_curves_tell_outcomes_apart_by_colour(mixed):
    img = _decode(render_png(mixed, "learning_curves"))[..., :3]
    for reason, hex_colour in OUTCOME_COLOURS.items():
        colour = np.array(mcolors.to_rgb(hex_colour))
        close = np.abs(img - colour).max(axis=-1) < 0.04
        assert close.sum() >= 20, f"{reason} ({hex_colour}) is missing from the learning curves"


def test_rendering_is_deterministic(mixed):
    assert render_pngs(mixed) == render_pngs(mixed)


def test_minimized_metric_renders(storage):
    study = _study(storage, direction="minimize", metric="val_loss")
    for i in range(8):
        _add(study, i, ["max_epochs", "pruned", "early_stopped", "diverged"][i % 4],
             [MAX_EPOCHS, 2, 6, 2][i % 4], ceiling=0.5 + 0.05 * i)
    for name in PLOTS:
        assert _png_size(render_png(study, name, 640, 480)) == (640, 480)


def test_param_importances_over_completed_trials(mixed):
    imp = param_importances(mixed)
    assert set(imp) == set(DISTS)
    assert sum(imp.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in imp.values())
    assert list(imp.values()) == sorted(imp.values(), reverse=True)


def test_param_importances_need_two_completed_trials(storage):
    study = _study(storage)
    _add(study, 0, "max_epochs", MAX_EPOCHS)
    for i in range(1, 6):
        _add(study, i, "pruned", 2)
    with pytest.raises(ValueError, match="at least 2 completed trials"):
        param_importances(study)
    # The picture says so instead of failing.
    assert _png_size(render_png(study, "importances")) == (1000, 600)


def test_param_importances_need_two_searched_parameters(storage):
    study = _study(storage)
    for i in range(6):
        params = {"learning_rate": _params(i)["learning_rate"]}
        _add(study, i, "max_epochs", MAX_EPOCHS, ceiling=0.6 + 0.05 * i, params=params)
    with pytest.raises(ValueError, match="learning_rate"):
        param_importances(study)
    assert _png_size(render_png(study, "importances")) == (1000, 600)


def test_lr_vs_batch_uses_fixed_values_when_the_job_fixed_one(storage):
    yellow = np.array(mcolors.to_rgb("#FDE725"))  # the better end of the value colour scale

    def has_yellow(png):
        return (np.abs(_decode(png)[..., :3] - yellow).max(axis=-1) < 0.03).any()

    with_fixed, without = _study(storage, "fixed"), _study(storage, "unknown")
    for i in range(6):
        p = _params(i)
        params = {"learning_rate": p["learning_rate"], "dropout": p["dropout"]}
        reason, epochs = ["max_epochs", "pruned"][i % 2], [MAX_EPOCHS, 3][i % 2]
        # What search.runner.run_trial records for a dimension the job fixed.
        _add(with_fixed, i, reason, epochs, params=params, extra={"fixed_batch_size": 64})
        _add(without, i, reason, epochs, params=params)
    assert has_yellow(render_png(with_fixed, "lr_vs_batch"))
    # Without any batch size there is nothing to place; the figure says so.
    assert not has_yellow(render_png(without, "lr_vs_batch"))


def test_the_parameter_that_drives_the_value_is_the_most_important(storage):
    study = _study(storage)
    for i in range(40):
        p = _params(i)
        # Only the learning rate matters: the value peaks at lr = 1e-2.
        value = 0.95 - 0.1 * abs(math.log10(p["learning_rate"]) + 2)
        study.add_trial(optuna.create_trial(
            value=value, params=p, distributions=DISTS,
            user_attrs={"stop_reason": "max_epochs", "stopped_epoch": MAX_EPOCHS}))
    imp = param_importances(study)
    assert next(iter(imp)) == "learning_rate"
    assert imp["learning_rate"] > 0.5


def test_param_importances_use_ped_anova_as_the_plot_says(mixed, monkeypatch):
    calls = []
    real = optuna.importance.get_param_importances

    def spy(study, **kw):
        calls.append(kw.get("evaluator"))
        return real(study, **kw)

    monkeypatch.setattr(optuna.importance, "get_param_importances", spy)
    param_importances(mixed)
    assert len(calls) == 1
    assert isinstance(calls[0], optuna.importance.PedAnovaImportanceEvaluator)


def _examples_study(storage, n_train=None):
    """Steps in examples (1000 rows an epoch, reported every 250), as run_trial records them."""
    study = optuna.create_study(storage=storage, direction="maximize")
    study.set_user_attr("spec", {"metric": "val_accuracy", "max_epochs": 2,
                                 "pruner": {"name": "successive_halving",
                                            "resource": "examples"}})
    for i, steps in enumerate([8, 3, 5] if n_train else [3]):
        iv = {250 * k: 0.5 + 0.01 * k + 0.001 * i for k in range(1, steps + 1)}
        attrs = {}
        if n_train:
            attrs = {"stop_reason": "max_epochs" if steps == 8 else "pruned",
                     "examples_seen": 250 * steps + 7, "epochs_trained": round(
                         (250 * steps + 7) / n_train, 4)}
        study.add_trial(optuna.create_trial(
            state=TrialState.COMPLETE if steps == 8 else TrialState.PRUNED,
            value=max(iv.values()) if steps == 8 else None, params=_params(i),
            distributions=DISTS, user_attrs=attrs, intermediate_values=iv))
    return study


def test_learning_curves_in_examples_are_drawn_over_epochs(storage):
    fig = render_figure(_examples_study(storage, n_train=1000), "learning_curves")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "epoch"
    xs = np.concatenate([seg[:, 0] for c in ax.collections if hasattr(c, "get_segments")
                         for seg in c.get_segments()])
    assert xs.min() == pytest.approx(0.25) and xs.max() == pytest.approx(2.0)


def test_learning_curves_in_examples_say_so_while_epochs_are_unknown(storage):
    # No trial recorded how many examples it saw (as while the first runs): steps stay examples.
    fig = render_figure(_examples_study(storage), "learning_curves")
    assert fig.axes[0].get_xlabel() == "examples seen"
