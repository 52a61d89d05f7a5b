"""Config loading and validation: every error names its key (no Spark needed)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.preflight import preflight

BASE = {
    "source": {"path": "src"},
    "outputs": [{"name": "emb_384", "dim": 384}],
    "sink": {"path": "out"},
}


def _cfg(**overrides):
    raw = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in BASE.items()}
    for key, value in overrides.items():
        raw[key] = value
    return raw


def test_defaults_and_paths_resolved_against_config_dir(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "source: {path: data/src}\noutputs: [{name: e, dim: 8}]\nsink: {path: out}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.source.path == str(tmp_path / "data" / "src")
    assert cfg.sink.path == str(tmp_path / "out")
    from pipeline.tables.paths import TablePaths

    paths = TablePaths.of(cfg)
    assert paths.quarantine == str(tmp_path / "out") + "_quarantine"
    assert (paths.runs, paths.samples) == (str(tmp_path / "_embedding_runs"),
                                           str(tmp_path / "_embedding_samples" / "out"))
    assert TablePaths.beside("s3://bucket/t/emb").drift == "s3://bucket/t/_embedding_drift"
    # the model's own, filled in by the preflight (test_model_stack.py)
    assert cfg.model.pooling == "auto" and cfg.model.max_length is None
    assert cfg.model.prompt is None and cfg.model.parity_check
    assert cfg.sink.mode == "incremental"


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(model={"max_lenght": 128}))
    msg = str(err.value)
    assert "model.max_lenght" in msg and "did you mean 'max_length'" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(model={"pooling": "median"}))
    assert "model.pooling" in str(err.value)
    assert "auto, mean, cls, last_token, max, weightedmean" in str(err.value)


def test_wrong_type_and_missing_required():
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.dim.*integer"):
        parse_config(_cfg(outputs=[{"name": "e", "dim": "big"}]))
    raw = _cfg()
    del raw["sink"]
    with pytest.raises(ConfigError, match="'sink'.*required"):
        parse_config(raw)


@pytest.mark.parametrize("outputs, pattern", [
    ([{"name": "e", "dim": 8}, {"name": "e", "dim": 4}], r"outputs\[1\]\.name.*duplicate"),
    ([{"name": "1bad", "dim": 8}], r"outputs\[0\]\.name.*not a valid column name"),
    ([{"name": "run_id", "dim": 8}], r"outputs\[0\]\.name.*reserved"),
    ([{"name": "e", "dim": 0}], r"outputs\[0\]\.dim.*positive"),
    ([], r"'outputs'.*at least one"),
])
def test_output_validation(outputs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(_cfg(outputs=outputs))


def test_overrides_dotted_list_and_freeform(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "source: {path: s}\noutputs: [{name: e, dim: 8}, {name: f, dim: 4}]\nsink: {path: o}\n")
    cfg = load_config(tmp_path / "c.yaml", [
        "model.max_length=128", "outputs.1.dim=2", "spark.conf.spark.sql.shuffle.partitions=3",
        "model.prompt=query: "])
    assert cfg.model.max_length == 128
    assert cfg.outputs[1].dim == 2
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": 3}
    assert cfg.model.prompt == "query: "  # looks like a mapping, stays a string
    with pytest.raises(ConfigError, match="--set"):
        load_config(tmp_path / "c.yaml", ["model.max_length"])
    with pytest.raises(ConfigError, match="no list item '5'"):
        load_config(tmp_path / "c.yaml", ["outputs.5.dim=3"])


def test_dim_larger_than_hidden_size_is_caught_before_spark(tmp_path):
    (tmp_path / "src").mkdir()
    cfg = parse_config(_cfg(source={"path": str(tmp_path / "src"), "format": "parquet"},
                            outputs=[{"name": "big", "dim": 512}]))
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.dim.*512.*output dimension 384"):
        preflight(cfg)
    # a token budget below the model's own max length (256): caught once it is known
    cfg = parse_config(_cfg(source={"path": str(tmp_path / "src"), "format": "parquet"},
                            model={"token_budget": 200}))
    with pytest.raises(ConfigError, match=r"model\.token_budget.*>= model\.max_length \(256\)"):
        preflight(cfg)


def test_config_hash_is_stable_and_sensitive():
    a, b = parse_config(_cfg()), parse_config(_cfg())
    assert a.config_hash() == b.config_hash()
    c = parse_config(_cfg(model={"max_length": 64}))
    assert c.config_hash() != a.config_hash()


def test_missing_source_and_model_are_one_line_errors_before_spark(tmp_path):
    from pipeline.errors import ModelError, SourceError

    cfg = parse_config(_cfg(source={"path": str(tmp_path / "nope")}))
    with pytest.raises(SourceError, match="source path not found"):
        preflight(cfg)
    (tmp_path / "plain").mkdir()
    cfg = parse_config(_cfg(source={"path": str(tmp_path / "plain"), "format": "delta"}))
    with pytest.raises(SourceError, match="not a Delta table"):
        preflight(cfg)
    for name, pattern in ((str(tmp_path / "no_model_here"), "model directory not found"),
                          ("not-an-installed-package", "neither a local directory"),
                          (str(tmp_path / "plain"), "has no config.json")):
        cfg = parse_config(_cfg(source={"path": str(tmp_path / "plain"), "format": "parquet"},
                                model={"name_or_path": name}))
        with pytest.raises(ModelError, match=pattern):
            preflight(cfg)


@pytest.mark.parametrize(("section", "pattern"), [
    ({"drift": {"canary": {"min_cosine": 0.99999}}},
     r"drift\.canary\.min_cosine.*<= drift\.canary\.same_runtime"),
    ({"drift": {"canary": {"same_runtime": 1.5}}}, r"drift\.canary\.same_runtime.*between 0"),
    ({"drift": {"distribution": {"permutations": 50, "mmd_alpha": 0.001}}},
     r"drift\.distribution\.permutations.*at least 1000"),
    ({"drift": {"distribution": {"on_breach": "stop"}}}, r"on_breach.*warn, fail"),
    ({"drift": {"canary": {"texts": "nope.txt"}}}, r"drift\.canary\.texts.*not found"),
    ({"model": {"token_budget": 0}}, r"model\.token_budget.*positive integer or null"),
    ({"model": {"token_budget": 100, "max_length": 256}},
     r"model\.token_budget.*>= model\.max_length \(256\)"),
    ({"model": {"max_batch_rows": -1}}, r"model\.max_batch_rows.*positive integer or null"),
    ({"lineage": {"transport": "file"}}, r"lineage\.path.*file transport"),
    ({"lineage": {"transport": "http"}}, r"lineage\.url.*Marquez"),
    ({"lineage": {"transport": "kafka"}}, r"lineage\.transport.*none, console, file, http"),
    ({"sink": {"path": "o", "partition_by": "run_id"}}, r"sink\.partition_by.*output table"),
    ({"sink": {"path": "o", "partition_by": "text"}}, r"sink\.partition_by.*or the text"),
    ({"sink": {"path": "o", "partition_by": "a-b"}}, r"sink\.partition_by.*not a valid"),
    ({"sink": {"path": "o", "bookkeeping_schema": "ops"}},
     r"sink\.bookkeeping_schema.*sink given by sink\.table"),
    ({"sink": {"table": "a.b", "bookkeeping_schema": "s3://x/ops"}},
     r"sink\.bookkeeping_schema.*schema name"),
])
def test_model_drift_and_lineage_validation(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(_cfg(**section))


def test_drift_and_lineage_paths_resolve_against_the_config(tmp_path):
    (tmp_path / "canary.txt").write_text("one\ntwo\n")
    (tmp_path / "c.yaml").write_text(
        "source: {path: src}\noutputs: [{name: e, dim: 8}]\nsink: {path: out}\n"
        "drift: {canary: {texts: canary.txt}}\n"
        "lineage: {transport: file, path: ol/events.jsonl}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.drift.canary.texts == str(tmp_path / "canary.txt")
    assert cfg.lineage.path == str(tmp_path / "ol" / "events.jsonl")
    from pipeline.drift import canary_texts
    from pipeline.tables.paths import TablePaths

    assert canary_texts(cfg.drift.canary.texts) == ["one", "two"]
    assert TablePaths.of(cfg).drift == str(tmp_path / "_embedding_drift")
    assert TablePaths.of(cfg).canary == str(tmp_path / "_embedding_canary")


def test_an_error_raised_on_an_executor_comes_back_as_its_own_one_line_error():
    from pipeline.errors import ConfigError, ModelError, raised_on_worker

    trace = ("An exception was thrown from the Python worker.\nTraceback (most recent call "
             "last):\n  File \"engine.py\", line 138, in __init__\npipeline.errors.ConfigError: "
             "config error at 'model.device': cuda was asked for but no CUDA device is "
             "visible\n\tat org.apache.spark.api.python.BasePythonRunner")
    err = raised_on_worker(RuntimeError(trace))
    assert isinstance(err, ConfigError) and err.key == "model.device" and err.exit_code == 2
    assert str(err) == ("config error at 'model.device': cuda was asked for but no CUDA "
                        "device is visible (raised on an executor)")
    model = raised_on_worker(RuntimeError("pipeline.errors.ModelError: no weights in /m"))
    assert isinstance(model, ModelError) and model.exit_code == 4
    assert raised_on_worker(RuntimeError("ValueError: something else")) is None
    assert raised_on_worker(RuntimeError("pipeline.errors.Nope: x")) is None
