"""Settings read from HPTUNE_* variables, with their bounds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_reap_interval_is_read_from_the_environment(monkeypatch):
    assert Settings().reap_interval == 5.0
    monkeypatch.setenv("HPTUNE_REAP_INTERVAL", "0.5")
    assert Settings().reap_interval == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "3601", "nan", "inf", "soon"])
def test_a_hostile_reap_interval_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("HPTUNE_REAP_INTERVAL", value)
    with pytest.raises(ValidationError, match="reap_interval"):
        Settings()
