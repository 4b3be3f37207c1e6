"""pytest-alembic's built-in checks, on SQLite and on PostgreSQL (see conftest.py).

- one head revision;
- base to head upgrades cleanly;
- every revision upgrades, downgrades and upgrades again (test_up_down_consistency);
- autogenerate against service.models.Base.metadata finds nothing to do: the migrations build
  exactly the tables the models describe (env.py's include_name leaves Optuna's tables out).
"""

from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]
