"""Every trial of a job's study as CSV, one row per trial, for spreadsheets and pandas."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

from search.report import trial_to_dict
from search.spec import CORE_PARAMS

# Columns before and after the parameter columns, in order.
LEADING_COLUMNS = ("number", "state", "stop_reason", "value", "stopped_epoch", "best_epoch")
TRAILING_COLUMNS = ("test_accuracy", "train_seconds", "datetime_start", "datetime_complete")


def param_columns(trials: Sequence[FrozenTrial]) -> list[str]:
    """Parameter names of the trials, sampled or fixed: the core four first, then the rest."""
    names = {name for t in trials for name in t.params}
    names |= {k.removeprefix("fixed_") for t in trials for k in t.user_attrs
              if k.startswith("fixed_")}
    order = {p: i for i, p in enumerate(CORE_PARAMS)}
    return sorted(names, key=lambda p: (order.get(p, len(order)), p))


def render_csv(study: optuna.Study, *, trials: Sequence[FrozenTrial] | None = None) -> str:
    """One row per trial: outcome, value, epochs, every parameter, test accuracy and times.

    A parameter the job fixed is written with its fixed value, so each row holds the values the
    trial actually trained with. Missing values (None) are empty cells; floats keep full precision.
    `trials` are the study's when the caller has read them already.
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    params = param_columns(trials)
    buf = io.StringIO()
    writer = csv.writer(buf)  # RFC 4180 line ends (CRLF), as text/csv expects
    writer.writerow([*LEADING_COLUMNS, *params, *TRAILING_COLUMNS])
    for t in trials:
        row = trial_to_dict(t)
        details = row["details"]
        writer.writerow([
            *(row[c] for c in LEADING_COLUMNS),
            *(t.params.get(p, t.user_attrs.get(f"fixed_{p}")) for p in params),
            details.get("test_accuracy"),
            details.get("train_seconds"),
            row["datetime_start"],
            row["datetime_complete"],
        ])
    return buf.getvalue()

