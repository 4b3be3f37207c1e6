"""Faults that tests inject into a worker on purpose, kept out of the worker's own logic.

The worker builds one `FaultInjector` from its settings and calls it at fixed points of a
trial; unless a test set `HPTUNE_TEST_CRASH_ON_PARAM`, every call is a no-op.
"""

from __future__ import annotations

import logging
import os

import optuna

from service.settings import Settings

# The worker's logger: a test reads the crash line in the worker's log.
log = logging.getLogger("hptune.worker")

# Exit status of a worker that exits on purpose in a test (HPTUNE_TEST_CRASH_ON_PARAM).
TEST_CRASH_EXIT_CODE = 86


def parse_crash_param(value: str | None) -> tuple[str, str] | None:
    """HPTUNE_TEST_CRASH_ON_PARAM "NAME=VALUE" as (name, value), or None."""
    if not value:
        return None
    name, _, target = value.partition("=")
    return name.strip(), target.strip()


def param_matches(params: dict[str, object], crash: tuple[str, str] | None) -> bool:
    """Whether a trial's parameters select it for the test crash (numbers compare as floats)."""
    if crash is None or crash[0] not in params:
        return False
    value = params[crash[0]]
    try:
        return float(value) == float(crash[1])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value) == crash[1]


class FaultInjector:
    """No faults: what every worker outside a fault-injection test runs with."""

    @staticmethod
    def from_settings(settings: Settings, worker_name: str) -> FaultInjector:
        crash = parse_crash_param(settings.test_crash_on_param)
        if crash is None:
            return FaultInjector()
        return CrashOnParam(crash, worker_name)

    def after_epoch(self, trial: optuna.Trial) -> None:
        """Called at each epoch end (each report) of a running trial, before any stop check."""


class CrashOnParam(FaultInjector):
    """Hard-exits the worker at the first epoch end of a trial whose parameter matches."""

    def __init__(self, crash: tuple[str, str], worker_name: str) -> None:
        self.crash = crash
        self.worker_name = worker_name

    def after_epoch(self, trial: optuna.Trial) -> None:
        if param_matches(trial.params, self.crash):
            log.error("%s: HPTUNE_TEST_CRASH_ON_PARAM matches trial %s %s; exiting hard",
                      self.worker_name, trial.number, trial.params)
            logging.shutdown()
            os._exit(TEST_CRASH_EXIT_CODE)
