"""The early-stopped trial report, built from a job's study alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.spec import JobSpec
from search.study import (
    ATTR_BEST_EPOCH,
    ATTR_STOP_CAUSE,
    ATTR_STOP_REASON,
    ATTR_STOPPED_EPOCH,
    StopCause,
)
from trainer.vocab import StopReason

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# Trial user attributes that are bookkeeping rather than details of the stop.
_NOT_DETAILS = {ATTR_STOP_REASON, ATTR_STOPPED_EPOCH, ATTR_BEST_EPOCH, "curves"}


def _iso(dt: Any) -> str | None:
    return dt.isoformat() if dt is not None else None


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def stop_reason(trial: FrozenTrial) -> str | None:
    """The recorded reason, or one inferred from the state for trials that never recorded one."""
    reason = trial.user_attrs.get(ATTR_STOP_REASON)
    if reason:
        return reason
    if trial.state == TrialState.FAIL:
        return StopReason.FAILED
    if trial.state == TrialState.PRUNED:
        return StopReason.PRUNED
    return None


def retry_links(trials: list[FrozenTrial]) -> dict[int, int]:
    """{failed trial number: number of the trial that re-ran its parameters} for the study."""
    return {t.system_attrs["retry_history"][-1]: t.number for t in trials
            if t.system_attrs.get("retry_history")}


def trial_to_dict(trial: FrozenTrial, retried_as: int | None = None) -> dict[str, Any]:
    """A trial as the REST API shows it; `retried_as` names the retry of a failed trial.

    A retry carries `retry_of` (the first trial of its chain) and `retry_history` (every trial
    of the chain, the one it directly re-runs last); a failed trial that was retried carries
    `retried_as`, so both ends of each link are shown.
    """
    details = {k: _finite(v) for k, v in trial.user_attrs.items() if k not in _NOT_DETAILS}
    retry_of = trial.system_attrs.get("failed_trial")
    if retry_of is not None:
        details["retry_of"] = retry_of
        details["retry_history"] = trial.system_attrs.get("retry_history", [])
    if retried_as is not None:
        details["retried_as"] = retried_as
    return {
        "number": trial.number,
        "state": trial.state.name,
        "params": trial.params,
        "value": _finite(trial.value) if trial.values else None,
        "intermediate_values": {str(k): _finite(v) for k, v in trial.intermediate_values.items()},
        "stop_reason": stop_reason(trial),
        "stopped_epoch": trial.user_attrs.get(ATTR_STOPPED_EPOCH,
                                              trial.last_step if trial.last_step else None),
        "best_epoch": trial.user_attrs.get(ATTR_BEST_EPOCH),
        "datetime_start": _iso(trial.datetime_start),
        "datetime_complete": _iso(trial.datetime_complete),
        "details": details,
    }


def trials_to_dicts(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    """The study's trials as the REST API shows them, failed trials linked to their retries."""
    retried_as = retry_links(trials)
    return [trial_to_dict(t, retried_as.get(t.number)) for t in trials]


def epochs_trained(row: dict[str, Any]) -> float:
    """Epochs a trial (as trial_to_dict shows it) really trained.

    Fractional if pruned mid-epoch; an audited trial counts the epochs it trained on after the
    pruner's verdict.
    """
    d = row["details"]
    if d.get("audited"):
        return float(d["audit_trained_epochs"])
    exact = d.get("epochs_trained")
    return float(exact) if exact is not None else float(row["stopped_epoch"] or 0)


def epochs_saved(row: dict[str, Any], max_epochs: int) -> tuple[str, float] | None:
    """("pruned" or "early_stopped", epochs not trained) for a finished trial that really
    stopped before `max_epochs`; None for any other trial.

    Diverged trials count as pruned. An audited trial saved nothing by its pruning, as it
    trained on; only an early stop or divergence of its continued run saved epochs.
    """
    if row["state"] not in ("COMPLETE", "PRUNED"):
        return None
    d = row["details"]
    reason = d.get("audit_stop_reason") if d.get("audited") else row["stop_reason"]
    cause = {StopReason.PRUNED: StopReason.PRUNED, StopReason.DIVERGED: StopReason.PRUNED,
             StopReason.EARLY_STOPPED: StopReason.EARLY_STOPPED}.get(reason)
    if cause is None:
        return None
    return cause, max(max_epochs - epochs_trained(row), 0.0)


def _tidy(epochs: float) -> float | int:
    """Whole epochs as an int, partial ones to two decimals."""
    return int(epochs) if float(epochs).is_integer() else round(epochs, 2)


def counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state, under the names the job JSON uses."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    for t in trials:
        key = {
            TrialState.COMPLETE: "complete",
            TrialState.PRUNED: "pruned",
            TrialState.FAIL: "failed",
            TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting",
        }[t.state]
        out[key] += 1
    return out


def step_in_words(step: Any, resource: str = "epochs") -> str:
    """A pruner step in its resource: "epoch 3" or "600 examples"."""
    return f"{step} examples" if resource == "examples" else f"epoch {step}"


def reason_in_words(t: dict[str, Any], resource: str = "epochs") -> str:
    """One sentence on why a trial stopped where it did, and the trials it is linked to.

    `resource` is what the pruner's steps count: "epochs" or "examples".
    """
    d = t["details"]
    words = _stop_in_words(t, resource)
    if d.get("audited"):
        words += f"; audited: trained on to epoch {d.get('audit_trained_epochs')}"
    if d.get("retry_history"):
        words += f"; a retry of trial #{d['retry_history'][-1]}"
    if "retried_as" in d:
        words += f"; retried as trial #{d['retried_as']}"
    return words


def _stop_in_words(t: dict[str, Any], resource: str) -> str:
    d = t["details"]
    reason = t["stop_reason"]
    if reason == StopReason.PRUNED:
        at = step_in_words(d.get("prune_step"), resource)
        where = f"rung {d['prune_rung']} ({at})" if "prune_rung" in d else at
        cut = d.get("prune_cutoff")
        cut_txt = f" against a cut-off of {cut:.4f}" if isinstance(cut, int | float) else ""
        peers = d.get("prune_n_peers")
        peers_txt = f" among {peers} trials" if peers is not None else ""
        val = d.get("prune_value")
        val_txt = f"{val:.4f}" if isinstance(val, int | float) else "n/a"
        return f"pruned by {d.get('pruner')} at {where}: value {val_txt}{cut_txt}{peers_txt}"
    if reason == StopReason.EARLY_STOPPED:
        return (f"early-stopped: no improvement for {d.get('patience')} epochs after "
                f"best epoch {t['best_epoch']}")
    if reason == StopReason.DIVERGED:
        return f"diverged at epoch {d.get('diverged_epoch')} (loss {d.get('diverged_loss')})"
    if reason == StopReason.CANCELLED:
        return {StopCause.HANDED_BACK: "handed back by a worker that was stopped",
                StopCause.TIMED_OUT: "stopped when its job timed out"}.get(
                    d.get(ATTR_STOP_CAUSE), "cancelled with its job")
    if reason == StopReason.FAILED:
        err = d.get("error")
        return f"failed: {err}" if err else "failed (worker lost)"
    if reason == StopReason.MAX_EPOCHS:
        return "ran to max_epochs"
    return str(reason)


def build_report(study: optuna.Study, spec: JobSpec, job: dict[str, Any], *,
                 trials: Sequence[FrozenTrial] | None = None) -> dict[str, Any]:
    """Summary, best trial, every trial stopped before `max_epochs` and the compute it saved.

    One pass over the trials: `trials` when the caller has read them (the service reads a
    job's page by page), else the study's. Each is presented once (trial_to_dict) and only
    what the report shows is kept: the stopped trials' rows (it lists every one), the
    audited ones and the best.
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    tally = _Tally(spec, study.direction == optuna.study.StudyDirection.MAXIMIZE)
    retried_as = retry_links(trials)
    for t in trials:
        tally.add(t, trial_to_dict(t, retried_as.get(t.number)))
    return tally.report(job)


_STATE_KEYS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
               TrialState.FAIL: "failed", TrialState.RUNNING: "running",
               TrialState.WAITING: "waiting"}


class _Tally:
    """What build_report gathers in its one pass over a study's trials."""

    def __init__(self, spec: JobSpec, maximize: bool) -> None:
        self.spec, self.maximize = spec, maximize
        self.counts = counts([])
        self.saved = {"pruned_epochs": 0.0, "early_stopped_epochs": 0.0,
                      "pruned_seconds": 0.0, "early_stopped_seconds": 0.0}
        self.total_epochs = self.full_seconds = 0.0
        self.finished = 0
        self.best: dict[str, Any] | None = None
        self.kept: list[float] = []  # the COMPLETE trials' values (the audit's yardstick)
        self.audited: list[dict[str, Any]] = []
        self.stopped: list[dict[str, Any]] = []
        self.first_start: Any = None
        self.last_end: Any = None

    def add(self, t: FrozenTrial, r: dict[str, Any]) -> None:
        self.counts[_STATE_KEYS[t.state]] += 1
        if t.datetime_start and (self.first_start is None or t.datetime_start < self.first_start):
            self.first_start = t.datetime_start
        if t.datetime_complete and (self.last_end is None or t.datetime_complete > self.last_end):
            self.last_end = t.datetime_complete
        epoch_s = float(r["details"].get("epoch_seconds") or 0.0)
        self.total_epochs += epochs_trained(r)
        if r["state"] in ("COMPLETE", "PRUNED"):
            self.finished += 1
            self.full_seconds += epoch_s * self.spec.max_epochs
        saving = epochs_saved(r, self.spec.max_epochs)
        if saving is not None:
            cause, epochs = saving
            self.saved[f"{cause}_epochs"] += epochs
            self.saved[f"{cause}_seconds"] += epochs * epoch_s
        if r["state"] == "COMPLETE" and r["value"] is not None:
            self.kept.append(r["value"])
            if self.best is None or (r["value"] > self.best["value"] if self.maximize
                                     else r["value"] < self.best["value"]):
                self.best = r
        if r["details"].get("audited"):
            self.audited.append(r)
        if (r["stop_reason"] not in (None, StopReason.MAX_EPOCHS)
                and r["state"] not in ("RUNNING", "WAITING")):
            self.stopped.append(_stopped_trial(r, self.spec))

    def report(self, job: dict[str, Any]) -> dict[str, Any]:
        saved, full_seconds = self.saved, self.full_seconds
        full_epochs = self.spec.max_epochs * self.finished
        saved["full_budget_epochs"] = full_epochs
        saved["full_budget_seconds"] = round(full_seconds, 3)
        for kind in ("pruned", "early_stopped"):
            # Shares from the exact sums; the figures shown are rounded afterwards.
            epochs, seconds = saved[f"{kind}_epochs"], saved[f"{kind}_seconds"]
            saved[f"{kind}_epochs"] = _tidy(epochs)
            saved[f"{kind}_seconds"] = round(seconds, 3)
            saved[f"{kind}_epochs_share"] = round(epochs / full_epochs, 4) if full_epochs else 0.0
            saved[f"{kind}_seconds_share"] = (round(seconds / full_seconds, 4) if full_seconds
                                              else 0.0)
        wall = ((self.last_end - self.first_start).total_seconds()
                if self.first_start and self.last_end else None)
        return {
            "job": job,
            "spec": self.spec.model_dump(mode="json"),
            "direction": "maximize" if self.maximize else "minimize",
            "counts": self.counts,
            "best_trial": _best_trial(self.best, self.spec.metric),
            "wall_seconds": wall,
            "total_epochs": _tidy(self.total_epochs),
            "compute_saved": saved,
            "stopped_trials": self.stopped,
            "pruning_audit": _audit(self.audited, sorted(self.kept), self.maximize),
        }


def _best_trial(best_row: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    """The report's best trial: the best COMPLETE value, or None before there is one."""
    if best_row is None:
        return None
    return {
        "number": best_row["number"],
        "params": best_row["params"],
        "value": best_row["value"],
        "metric": metric,
        "best_epoch": best_row["best_epoch"],
        "stopped_epoch": best_row["stopped_epoch"],
        "stop_reason": best_row["stop_reason"],
        "test_metrics": {k[5:]: v for k, v in best_row["details"].items()
                         if k.startswith("test_")},
    }


def _stopped_trial(r: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """A trial stopped before max_epochs, as the report lists it with its reason in words."""
    return {
        "number": r["number"],
        "state": r["state"],
        "params": r["params"],
        "stop_reason": r["stop_reason"],
        "stopped_epoch": r["stopped_epoch"],
        "best_epoch": r["best_epoch"],
        "value": r["value"],
        "reason": reason_in_words(r, spec.pruner.resource),
        "details": r["details"],
    }


def pruning_audit(rows: list[dict[str, Any]], maximize: bool) -> dict[str, Any] | None:
    """What the audited trials (pruned, then trained to the end anyway) say about the pruner.

    A false prune is an audited trial whose final value beats the best trial the pruner kept:
    it would have won the job. Regret is how much better the best of them would have been.
    """
    audited = [r for r in rows if r["details"].get("audited")]
    kept = sorted(r["value"] for r in rows if r["state"] == "COMPLETE" and r["value"] is not None)
    return _audit(audited, kept, maximize)


def _audit(audited: list[dict[str, Any]], kept: list[float], maximize: bool
           ) -> dict[str, Any] | None:
    """pruning_audit of the audited trials' rows against the kept values, in order."""
    if not audited:
        return None
    best_kept = (kept[-1] if maximize else kept[0]) if kept else None
    median_kept = kept[len(kept) // 2] if kept else None

    def better(a: float, b: float) -> bool:
        return a > b if maximize else a < b

    items = []
    for r in audited:
        d = r["details"]
        final = d.get("audit_best_value")
        beaten = sum(1 for v in kept if final is not None and better(final, v))
        items.append({
            "number": r["number"],
            "prune_step": d.get("prune_step"),
            "prune_rung": d.get("prune_rung"),
            "value_at_prune": d.get("prune_value"),
            "cutoff": d.get("prune_cutoff"),
            "final_value": final,
            "trained_epochs": d.get("audit_trained_epochs"),
            # Where the pruner would have stopped it, in epochs (prune_step may be examples).
            "pruned_epochs": d.get("epochs_trained", d.get("prune_step")),
            "share_of_kept_beaten": round(beaten / len(kept), 4) if kept else None,
            "false_prune": bool(final is not None and best_kept is not None
                                and better(final, best_kept)),
        })
    finals = [i["final_value"] for i in items if i["final_value"] is not None]
    best_audited = (max(finals) if maximize else min(finals)) if finals else None
    regret = None
    if best_audited is not None and best_kept is not None:
        gap = best_audited - best_kept if maximize else best_kept - best_audited
        regret = max(gap, 0.0)
    false = [i for i in items if i["false_prune"]]
    return {
        "n_audited": len(items),
        "false_prunes": len(false),
        "false_prune_rungs": sorted({i["prune_rung"] if i["prune_rung"] is not None
                                     else i["prune_step"] for i in false}),
        "beat_median_kept": sum(1 for i in items if i["final_value"] is not None
                                and median_kept is not None
                                and better(i["final_value"], median_kept)),
        "best_kept_value": best_kept,
        "best_audited_value": best_audited,
        "regret": regret,
        "audit_epochs": _tidy(sum((i["trained_epochs"] or 0) - (i["pruned_epochs"] or 0)
                                  for i in items)),
        "trials": items,
    }
