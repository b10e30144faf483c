"""`make mutate` runs each mutant's tests fastest first (tests/conftest.py); outside a mutation
run the order is untouched."""
from __future__ import annotations

import json
from types import SimpleNamespace

from tests import conftest


def items(*ids):
    return [SimpleNamespace(nodeid=i) for i in ids]


def test_tests_run_fastest_first_under_make_mutate(tmp_path, monkeypatch):
    stats = tmp_path / "mutmut-stats.json"
    stats.write_text(json.dumps({"duration_by_test": {"t::slow": 9.0, "t::fast": 0.1, "t::mid": 2.0}}))
    got = items("t::slow", "t::new", "t::mid", "t::fast", "t::other")
    monkeypatch.setenv("SIMMSTNET_MUTATE_DURATIONS", str(stats))
    conftest.pytest_collection_modifyitems(None, got)
    # measured tests by duration, then the unmeasured ones in their own order
    assert [i.nodeid for i in got] == ["t::fast", "t::mid", "t::slow", "t::new", "t::other"]


def test_the_order_is_untouched_outside_mutation_runs(tmp_path, monkeypatch):
    ids = ["t::slow", "t::fast"]
    monkeypatch.delenv("SIMMSTNET_MUTATE_DURATIONS", raising=False)
    got = items(*ids)
    conftest.pytest_collection_modifyitems(None, got)
    assert [i.nodeid for i in got] == ids
    # before mutmut has written its timings (its first run), or with a damaged file
    monkeypatch.setenv("SIMMSTNET_MUTATE_DURATIONS", str(tmp_path / "absent.json"))
    conftest.pytest_collection_modifyitems(None, got)
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setenv("SIMMSTNET_MUTATE_DURATIONS", str(tmp_path / "bad.json"))
    conftest.pytest_collection_modifyitems(None, got)
    assert [i.nodeid for i in got] == ids
