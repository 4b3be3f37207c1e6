"""The reporter one trial's objective talks to (search.objectives.Reporter), and the store of
its checkpoints and model that the caller provides (`TrialArtifacts`).

Pruning, the caller's stop check (cancel, timeout, hand-back) and, for objectives that do
not stop early themselves, the spec's patience are decided in `report`. A checkpoint carries
the reporter's own state (the values reported to the pruner, the history rows, the patience
count) around the objective's bytes, so a retried trial that resumes re-reports what its
predecessor reported and goes on from there exactly.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna

from search.objectives import EarlyStopping, History
from search.spec import JobSpec
from trainer import StopReason, TrainResult

_MAGIC = b"HPTCK1"
_HEADER = struct.Struct("<I")


class TrialArtifacts(Protocol):
    """Where a trial's checkpoints and model go (the service keeps them in its artifact
    store; without one, a trial takes no checkpoints)."""

    def save_checkpoint(self, trial: optuna.Trial, blob: bytes) -> None: ...

    def load_checkpoint(self, trial: optuna.Trial) -> bytes | None: ...

    def save_model(self, trial: optuna.Trial, onnx: bytes) -> None: ...


def pack(header: dict[str, Any], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return _MAGIC + _HEADER.pack(len(raw)) + raw + payload


def unpack(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and the objective's bytes of a checkpoint; ValueError if it is not one."""
    start = len(_MAGIC) + _HEADER.size
    if len(blob) < start or not blob.startswith(_MAGIC):
        raise ValueError("not an hptune checkpoint")
    (n,) = _HEADER.unpack_from(blob, len(_MAGIC))
    if start + n > len(blob):
        raise ValueError("truncated hptune checkpoint")
    header = json.loads(blob[start:start + n])
    if not isinstance(header, dict) or not isinstance(header.get("step"), int):
        raise ValueError("garbled hptune checkpoint header")
    return header, blob[start + n:]


def rungs(spec: JobSpec) -> set[int]:
    """Epochs at which the spec's successive-halving or Hyperband pruner compares trials."""
    p = spec.pruner
    if p.resource != "epochs" or p.name not in ("successive_halving", "hyperband"):
        return set()
    out, step = set(), p.min_resource
    while step <= spec.max_epochs:
        out.add(step)
        step *= p.reduction_factor
    return out


@dataclass(eq=False)
class TrialReporter:
    """search.objectives.Reporter for one Optuna trial, and the trainer's callbacks.

    Audited trials keep training after the pruner's verdict, silently: the study sees exactly
    what it would have seen without the audit.
    """

    trial: optuna.Trial
    spec: JobSpec
    should_stop: Callable[[], object]
    audit: bool
    artifacts: TrialArtifacts | None = None
    early: EarlyStopping | None = None
    # Steps in examples (spec.pruner.resource "examples"): report every `every` examples.
    by_examples: bool = False
    every: int = 0
    # The step the pruner stopped the trial at; set once.
    pruned_at: int | None = None
    # Whether the caller's stop check ended the trial; whether patience ran out.
    cancelled: bool = False
    early_stopped: bool = False
    # The epoch this trial resumed after (its chain's checkpoint), if it did.
    resumed_from: int | None = None
    history: History = field(init=False)
    reported: list[list[float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.history = History(self.spec.metric)
        self._rungs = rungs(self.spec)

    # --- the contract (search.objectives.Reporter) ----------------------------------------

    def report(self, step: int, metrics: Mapping[str, float]) -> bool:
        self.history.add(step, metrics)
        if self._stop_after(step, metrics):
            return False
        value = float(metrics.get(self.spec.metric, math.nan))
        if self.early is not None and self.early.update(step, value):
            self.early_stopped = True
            return False
        return True

    def checkpoint_due(self, step: int) -> bool:
        if self.artifacts is None or step >= self.spec.max_epochs:
            return False
        return step % self.spec.checkpoint_every == 0 or step in self._rungs

    def save_checkpoint(self, state: bytes) -> None:
        if self.artifacts is None:
            return
        early = self.early
        header = {"step": int(self.history.rows[-1]["epoch"]) if self.history.rows else 0,
                  "rows": self.history.rows, "reported": self.reported,
                  "early": [early.best, early.best_step, early.since_best] if early else None}
        self.artifacts.save_checkpoint(self.trial, pack(header, state))

    def load_checkpoint(self) -> bytes | None:
        blob = self.artifacts.load_checkpoint(self.trial) if self.artifacts else None
        if blob is None:
            return None
        header, payload = unpack(blob)
        self.history.rows = [dict(r) for r in header["rows"]]
        for step, value in header["reported"]:
            self.trial.report(value, int(step))
        self.reported = [list(p) for p in header["reported"]]
        if self.early is not None and header.get("early"):
            self.early.best, self.early.best_step, self.early.since_best = header["early"]
        self.resumed_from = int(header["step"])
        self.trial.set_user_attr("resumed_from_epoch", self.resumed_from)
        return payload

    def result(self, test_metrics: Mapping[str, float]) -> TrainResult:
        if self.early_stopped:
            reason = StopReason.EARLY_STOPPED
        elif self.pruned_at is not None or self.cancelled:
            reason = StopReason.PRUNED
        else:
            reason = StopReason.MAX_EPOCHS
        return self.history.result(reason, test_metrics, time.perf_counter() - self.started,
                                   examples_per_epoch=0)

    # --- the built-in trainer's callbacks (fit: a truthy return stops) -------------------

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        self.history.add(epoch, metrics)
        if not self.by_examples:
            return self._stop_after(epoch, metrics)
        return self._stop_requested()

    def on_examples(self, mark: int, metrics: dict[str, float]) -> bool:
        # A batch that passes several multiples of report_every reports once, at the last of
        # them: never more than one database write and pruning check per mini-batch.
        every = self.every
        if mark != int(metrics["examples"]) // every * every:
            return False
        return self._stop_after(mark, metrics)

    # --- shared ------------------------------------------------------------------------

    def _stop_after(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Report the metric at `step` (in the pruner's resource); True stops the trial."""
        value = float(metrics[self.spec.metric])
        # Diverged epochs are the trainer's to stop; audited trials report nothing past the
        # pruner's verdict.
        reportable = math.isfinite(value) and self.pruned_at is None
        if reportable:
            self.trial.report(value, step)
            self.reported.append([step, value])
        if self._stop_requested():
            return True
        if reportable and self.trial.should_prune():
            self.pruned_at = step
            return not self.audit
        return False

    def _stop_requested(self) -> bool:
        if self.should_stop():
            self.cancelled = True
            return True
        return False
