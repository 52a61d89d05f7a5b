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
from typing import TYPE_CHECKING

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


def write_demo_table(spark: SparkSession, path: str, limit: int | None = None,
                     repeat: int = 1) -> int:
    """Write the demo source table (overwrite); ``repeat`` copies it with new ids.

    Columns: id, name (qualified name), summary (first line), text (the docstring)
    and day (a synthetic date, the partition column of the backfill examples)."""
    import pandas as pd

    rows = demo_rows(limit)
    n = len(rows)
    frame = pd.DataFrame([{**r, "id": r["id"] + k * n} for k in range(repeat) for r in rows])
    schema = "id long, name string, summary string, text string, day date"
    (spark.createDataFrame(frame, schema=schema)
     .coalesce(1).write.format("delta").mode("overwrite").option("overwriteSchema", "true")
     .save(path))
    return len(frame)


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


def copy_model_files(model_dir, dest) -> None:
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


def random_weights_model(model_dir, dest, seed: int = 0) -> str:
    """A copy of a BERT-family model directory with random weights of the same
    shape: 'another model' for the canary."""
    import torch
    from transformers import AutoConfig, AutoModel

    copy_model_files(model_dir, dest)
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(dest)
    return str(dest)
