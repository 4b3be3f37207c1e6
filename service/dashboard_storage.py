"""What optuna-dashboard may read: one owner's studies (or every study for an admin), never write.

The gate in service/dashboard.py refuses writes and other owners' study ids before a request
reaches optuna-dashboard; this storage is the second wall, in case a route slips past it.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from service.db import Database
from service.trial_store import (
    FrozenStudy,
    owner_has_study,
    owner_study_ids,
    study_id,
    trial_study_id,
)

# Who owns a study is the service's word (hptune_jobs.owner), read by trial_store's named SQL.


class ReadOnlyStorageError(PermissionError):
    """A write through the dashboard's storage: the dashboard is read-only."""


class ScopedReadOnlyStorage(BaseStorage):
    """`base` as one owner sees it (every study when `owner` is None), with every write refused.

    A study or trial outside the scope reads as missing (KeyError, as Optuna answers for an
    unknown id), so optuna-dashboard's own 404s apply.
    """

    def __init__(self, base: BaseStorage, db: Database, owner: str | None) -> None:
        self._base = base
        self._db = db
        self.owner = owner

    # Scope checks.

    def _study(self, study_id: int) -> int:
        if self.owner is not None and not owner_has_study(self._db, self.owner, study_id):
            raise KeyError(f"No study with study_id {study_id} exists.")
        return study_id

    def _trial(self, trial_id: int) -> int:
        if self.owner is not None:
            study_id = trial_study_id(self._db, trial_id)
            if study_id is None:
                raise KeyError(f"No trial with trial_id {trial_id} exists.")
            self._study(study_id)
        return trial_id

    # Reads.

    def get_all_studies(self) -> list[FrozenStudy]:
        studies = self._base.get_all_studies()
        if self.owner is not None:
            mine = owner_study_ids(self._db, self.owner)
            studies = [s for s in studies if study_id(s) in mine]
        return sorted(studies, key=study_id)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._study(self._base.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._base.get_study_name_from_id(self._study(study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._base.get_study_directions(self._study(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._base.get_study_user_attrs(self._study(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._base.get_study_system_attrs(self._study(study_id))

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._base.get_all_trials(self._study(study_id), deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int,
                     state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._base.get_n_trials(self._study(study_id), state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._base.get_best_trial(self._study(study_id))

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._base.get_trial_id_from_study_id_trial_number(self._study(study_id),
                                                                   trial_number)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._base.get_trial(self._trial(trial_id))

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._base.get_trial_number_from_id(self._trial(trial_id))

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._base.get_trial_param(self._trial(trial_id), param_name)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._base.get_trial_params(self._trial(trial_id))

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._base.get_trial_user_attrs(self._trial(trial_id))

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._base.get_trial_system_attrs(self._trial(trial_id))

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        raise ReadOnlyStorageError("the dashboard is read-only")

    def remove_session(self) -> None:
        self._base.remove_session()

    # Writes: none.

    def _refuse(self, *_args: Any, **_kwargs: Any) -> Any:
        raise ReadOnlyStorageError("the dashboard is read-only")

    def create_new_study(self, directions: Sequence[StudyDirection],
                         study_name: str | None = None) -> int:
        return self._refuse()

    def delete_study(self, study_id: int) -> None:
        self._refuse()

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._refuse()

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._refuse()

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._refuse()

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._refuse()

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        return self._refuse()

    def set_trial_intermediate_value(self, trial_id: int, step: int,
                                     intermediate_value: float) -> None:
        self._refuse()

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._refuse()

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._refuse()


# Every BaseStorage method that writes (tests check that each raises). A method a later Optuna
# adds to BaseStorage is either abstract (this class then fails to build: closed) or built on
# the methods above (then checked by them).
WRITE_METHODS: tuple[str, ...] = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "create_new_trial", "set_trial_param", "set_trial_state_values",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "check_trial_is_updatable",
)
