"""The OpenLineage events the emitter builds, checked offline against the official
schemas and the spec's rules (tests/openlineage_spec.py), without Spark; and the
checker itself catches each rule broken. test_drift.py checks a real run's events."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest

from pipeline import lineage
from pipeline.config import load_config
from pipeline.results import RunResult
from tests.conftest import write_config
from tests.openlineage_spec import validate_event


def _events(tmp_path, extra: str = "") -> dict[str, dict]:
    from openlineage.client.serde import Serde

    cfg = load_config(write_config(tmp_path, str(tmp_path / "src"), str(tmp_path / "out"),
                                   extra="lineage: {transport: console}\n" + extra))
    emitter = lineage.Emitter(cfg, lineage.new_lineage_run_id(), "embed.out")
    schemas = {"source": [("id", "bigint"), ("text", "string")],
               "output": [("id", "bigint"), ("emb_384", "array<float>")]}
    # a real RunResult (a renamed field breaks this test), as run() makes it
    result = RunResult(
        run_id="r1", output_path=cfg.sink.path, quarantine_path=cfg.sink.path + "_quarantine",
        rows_read=12, rows_embedded=10, rows_quarantined=2, rows_skipped=0, columns=["emb_384"],
        model="m", model_fingerprint="fp", runtime="cpu/fp32/sdpa", output_version=7,
        seconds=1.0, source_version=3, chunks_written=40, schemas=schemas)
    started = datetime(2024, 1, 2, tzinfo=UTC)
    meta = lineage.RunMeta("r1", started, None, "fp", partition="2024-01-02")
    built = {"START": emitter.event("START", meta),
             "COMPLETE": emitter.event("COMPLETE", meta, result),
             "FAIL": emitter.event("FAIL", meta, error="ValueError: x")}
    # the client adds its own facets (tags) as it emits: check what it would send
    assert emitter.client is not None
    return {state: json.loads(Serde.to_json(emitter.client.update_event_tags_facets(event)))
            for state, event in built.items()}


def test_every_event_follows_the_spec(tmp_path):
    events = _events(tmp_path)
    for event in events.values():
        validate_event(event)
    done = events["COMPLETE"]
    assert [o["outputFacets"]["outputStatistics"]["rowCount"] for o in done["outputs"]] == [10, 2]
    assert done["run"]["facets"]["nominalTime"]["nominalStartTime"].startswith("2024-01-02")
    assert events["FAIL"]["run"]["facets"]["errorMessage"]["message"] == "ValueError: x"


def test_chunked_runs_count_passages_in_the_spec_facets(tmp_path):
    events = _events(tmp_path, "chunking: {mode: late, max_tokens: 64}\n")
    for event in events.values():
        validate_event(event)
    done = events["COMPLETE"]
    # the output dataset got 40 passage rows (of 10 documents)
    assert [o["outputFacets"]["outputStatistics"]["rowCount"] for o in done["outputs"]] == [40, 2]
    facet = done["run"]["facets"]["embedPipeline_embedding"]
    assert facet["passagesWritten"] == 40 and facet["chunking"]["mode"] == "late"


def test_a_sparse_column_is_named_by_its_kind_in_the_spec_facet(tmp_path):
    outputs = "[{name: emb_384, dim: 384}, {name: sp, kind: sparse, max_active_dims: 64}]"
    cfg_extra = "outputs: " + outputs + "\n"
    events = _events(tmp_path, cfg_extra)
    for event in events.values():
        validate_event(event)
    columns = events["COMPLETE"]["run"]["facets"][lineage.EMBEDDING_FACET_KEY]["outputs"]
    assert {k: columns[1][k] for k in ("name", "dim", "kind", "max_active_dims")} == {
        "name": "sp", "dim": 0, "kind": "sparse", "max_active_dims": 64}
    assert "kind" not in columns[0]


@pytest.mark.parametrize("breaks, message", [
    (lambda e: e["run"]["facets"].__setitem__(
        "embedding", e["run"]["facets"].pop(lineage.EMBEDDING_FACET_KEY)), "project prefix"),
    (lambda e: e["outputs"][0]["facets"].__setitem__(
        "outputStatistics", e["outputs"][0]["outputFacets"].pop("outputStatistics")),
     "sits where a DatasetFacet goes"),
    (lambda e: e["run"]["facets"][lineage.EMBEDDING_FACET_KEY].__setitem__(
        "_schemaURL", "https://example.com/docs/EmbeddingRunFacet.json"), "names no known"),
], ids=["unprefixed-custom-key", "statistics-as-dataset-facet", "schema-url-to-nowhere"])
def test_the_checker_catches_each_rule_broken(tmp_path, breaks, message):
    event = copy.deepcopy(_events(tmp_path)["COMPLETE"])
    breaks(event)
    with pytest.raises(AssertionError, match=message):
        validate_event(event)


def test_a_facet_that_breaks_its_schema_is_caught(tmp_path):
    from jsonschema import ValidationError

    event = _events(tmp_path)["COMPLETE"]
    del event["run"]["facets"][lineage.EMBEDDING_FACET_KEY]["modelFingerprint"]
    with pytest.raises(ValidationError, match="modelFingerprint"):
        validate_event(event)
