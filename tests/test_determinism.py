"""The same seed and the same calls give the same run, today as when the fingerprints were
recorded (tests/fingerprint.py): a refactoring must not change the simulation."""

from __future__ import annotations

import json

import pytest

from tests.fingerprint import BASELINE, all_names, run_one

_RECORDED = json.loads(BASELINE.read_text())


@pytest.mark.parametrize("name", all_names())
def test_run_matches_its_recorded_fingerprint(name: str) -> None:
    assert run_one(name) == _RECORDED[name]
