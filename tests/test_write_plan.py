"""The sink-mode rules (WritePlan) over every case, without Spark."""

from __future__ import annotations

import itertools

import pytest

from pipeline.config import parse_config
from pipeline.write_plan import MODEL_KEYS, WritePlan

MODES = ("incremental", "append", "overwrite")
CHANGES = (frozenset(), frozenset({"model_fingerprint"}), frozenset({"model", "model_fingerprint"}),
           frozenset({"max_length"}), frozenset({"model_fingerprint", "outputs"}))


def plan(mode="incremental", exists=True, changes=frozenset(), canary=True, baseline=True,
         backfill=False, filtered=False, deletes=False) -> WritePlan:
    return WritePlan(mode=mode, table_exists=exists, changes=changes if exists else frozenset(),
                     canary_enabled=canary, has_canary_baseline=baseline and exists,
                     backfill=backfill, filtered=filtered, delete_missing=deletes)


def all_plans():
    for mode, exists, changes, canary, baseline, backfill, deletes in itertools.product(
            MODES, (False, True), CHANGES, (False, True), (False, True), (False, True),
            (False, True)):
        yield plan(mode, exists, changes, canary, baseline, backfill, backfill, deletes)


def test_decide_reads_config_and_table_state(tmp_path):
    cfg = parse_config({"source": {"path": str(tmp_path)}, "outputs": [{"name": "e", "dim": 8}],
                        "sink": {"path": str(tmp_path / "out"), "mode": "append",
                                 "deletes": "delete"}})
    p = WritePlan.decide(cfg, {"canary_run": "r1"}, frozenset({"outputs"}), backfill=True,
                         filtered=True)
    assert p == WritePlan(mode="append", table_exists=True, changes=frozenset({"outputs"}),
                          canary_enabled=True, has_canary_baseline=True, backfill=True,
                          filtered=True, delete_missing=True)
    fresh = WritePlan.decide(cfg, None, frozenset(), backfill=False, filtered=False)
    assert not fresh.table_exists and not fresh.has_canary_baseline and fresh.rebaseline


def test_rules_hold_in_every_case():
    cases = list(all_plans())
    assert len(cases) == 480
    for p in cases:
        check_rules(p)


def check_rules(p: WritePlan) -> None:
    # compared with the table exactly when it exists and is not replaced
    assert p.compares_existing == (p.table_exists and p.mode != "overwrite")
    # int8 ranges come from the table exactly when its rows are kept
    assert p.calibration_source == ("table" if p.compares_existing else "fit")
    # deletes need the whole source read and a table whose rows are kept
    assert p.applies_deletes == (p.compares_existing and p.delete_missing and not p.filtered)
    # a new table, or an overwrite with another identity, stores a new canary baseline
    assert p.rebaseline == (not p.table_exists or (p.mode == "overwrite" and bool(p.changes)))
    # the canary answers first only for another model, on a table with a canary
    assert p.ask_canary_first == (p.canary_enabled and p.has_canary_baseline
                                  and p.mode != "overwrite" and bool(p.changes)
                                  and p.changes <= MODEL_KEYS)
    assert p.identity_check == ("never" if p.mode == "overwrite" else
                                "after_canary" if p.ask_canary_first else "now")
    assert p.rewrites_identity == (p.mode == "overwrite" and p.table_exists)
    assert p.probes_replacements == (p.compares_existing and p.mode == "incremental")
    # a run that will embed every row starts its workers and canary during the read
    assert p.warms_early == (not p.compares_existing)
    assert p.merge_keys == (("id",) if p.mode == "incremental" else ("id", "content_hash"))
    assert p.replaces_matched == (p.mode == "incremental")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backfill", (False, True))
@pytest.mark.parametrize("rows,replaces", [(0, False), (5, False), (5, True)])
def test_commit_kind(mode, backfill, rows, replaces):
    kind = plan(mode=mode, backfill=backfill).commit_kind(rows, replaces)
    if mode == "overwrite":
        assert kind == "overwrite"  # an overwrite replaces the table even with no rows
    elif rows == 0:
        assert kind == ("mark_txn" if backfill else "none")
    elif replaces and mode == "incremental":
        assert kind == "merge"  # replaces by id, and conflicts with a concurrent writer
    else:  # new ids (or new (id, hash) pairs in append mode): nothing is rewritten
        assert kind == ("blind_append" if backfill else "insert")


def test_plan_path_uses_the_change_feed_only_where_it_can_answer():
    asked: list[str] = []

    def fact(name, value):
        def ask():
            asked.append(name)
            return value
        return ask

    cdf = dict(source_is_delta=True, full_refresh=False, cdf_enabled=fact("cdf", True),
               last_version=fact("last", 4))
    assert plan().plan_path(**cdf) == ("cdf", "changes since source version 4")
    assert asked == ["cdf", "last"]
    asked.clear()
    assert plan(exists=False).plan_path(**cdf)[0] == "full"
    assert asked == []  # a new table needs no Spark job to know it reads everything
    for p, change, why in [
            (plan(), {"full_refresh": True}, "--full-refresh"),
            (plan(exists=False), {}, "new or replaced"),
            (plan(mode="overwrite"), {}, "new or replaced"),
            (plan(backfill=True, filtered=True), {}, "partition"),
            (plan(), {"source_is_delta": False}, "not a Delta table"),
            (plan(), {"cdf_enabled": lambda: False}, "Change Data Feed is off"),
            (plan(), {"last_version": lambda: None}, "no earlier successful run")]:
        path, note = p.plan_path(**{**cdf, **change})
        assert path == "full" and why in note, (p, change, note)


def test_canary_reference_is_stored_only_into_a_kept_table():
    assert plan().stores_canary_reference(True)
    assert not plan().stores_canary_reference(False)
    assert not plan(exists=False).stores_canary_reference(True)  # made with it already
    assert not plan(mode="overwrite").stores_canary_reference(True)  # identity rewritten


def test_a_changed_max_length_is_a_config_conflict_not_a_canary_question():
    p = plan(changes=frozenset({"max_length"}))
    assert not p.ask_canary_first and p.identity_check == "now"
    assert plan(changes=frozenset({"model_fingerprint"})).identity_check == "after_canary"
