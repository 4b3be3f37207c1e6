"""Optuna side of hptune: job specs, studies, the trial runner and reports."""

from search.pruners import build_pruner, explain_prune
from search.report import build_report, counts, trial_to_dict, trials_to_dicts
from search.runner import run_trial
from search.spec import JobSpec, metric_direction
from search.study import (
    ATTR_STOP_CAUSE,
    StopCause,
    TrialOutcome,
    build_sampler,
    create_study,
    load_study,
    study_name_for,
)

__all__ = [
    "ATTR_STOP_CAUSE",
    "JobSpec",
    "StopCause",
    "TrialOutcome",
    "build_pruner",
    "build_report",
    "build_sampler",
    "counts",
    "create_study",
    "explain_prune",
    "load_study",
    "metric_direction",
    "run_trial",
    "study_name_for",
    "trial_to_dict",
    "trials_to_dicts",
]
