"""The ONNX Runtime backends (``model.backend: onnx | onnx-int8``) on the CPU: the
exported graph equals torch, int8 stays close, the export is made once per machine
and model, and a table records which backend made it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, OutputSpec, load_config, parse_config
from pipeline.encoder import Encoder
from pipeline.errors import ConfigError, ModelError, SinkConflictError
from tests import model_families
from tests.conftest import cosine_rows, write_config

SPECS = (OutputSpec(name="e", dim=32), OutputSpec(name="l1", dim=16, layer=1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return model_families.build_all(tmp_path_factory.mktemp("onnx_models"),
                                    ("bert_cls", "xlmr_prompts", "qwen3_last", "gemma3_dense"))


@pytest.fixture(scope="module")
def mpnet(model_dir, tmp_path_factory) -> str:
    from transformers import AutoModel, AutoTokenizer, MPNetConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mpnet")
    AutoModel.from_config(MPNetConfig(vocab_size=30527, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4)
                          ).eval().save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def texts(demo_rows) -> list[str]:
    return [r["text"] for r in demo_rows[:80]]


def _encode(path: str, cache: Path, texts: list[str], backend: str = "torch",
            specs: tuple[OutputSpec, ...] = SPECS) -> dict[str, np.ndarray]:
    enc = Encoder(ModelConfig(name_or_path=path, backend=backend, onnx_cache=str(cache)), specs)
    return enc.encode_float(texts)[0]


@pytest.mark.parametrize("family", ["bert_cls", "xlmr_prompts", "qwen3_last", "mpnet"])
def test_the_exported_graph_equals_torch(family, tiny, mpnet, texts, tmp_path):
    """Every column, the 2D Matryoshka one at layer 1 included (the graph returns it)."""
    path = mpnet if family == "mpnet" else tiny[family]
    ours = _encode(path, tmp_path, texts, "onnx")
    ref = _encode(path, tmp_path, texts)
    for name in ref:
        assert cosine_rows(ours[name], ref[name]).min() >= 0.9999, (family, name)


def test_minilm_fp32_graph_and_int8_against_torch_on_the_canary(model_dir, tmp_path):
    from pipeline.drift import canary_texts

    canary = canary_texts()
    specs = (OutputSpec(name="e", dim=384), OutputSpec(name="e128", dim=128))
    ref = _encode(str(model_dir), tmp_path, canary, specs=specs)
    fp32 = _encode(str(model_dir), tmp_path, canary, "onnx", specs)
    enc = Encoder(ModelConfig(backend="onnx-int8", onnx_cache=str(tmp_path)), specs)
    assert enc.runtime.label == "cpu/int8/onnx" and not enc.packed
    int8 = enc.encode_float(canary)[0]
    for name in ref:
        assert cosine_rows(fp32[name], ref[name]).min() >= 0.9999, name
        assert cosine_rows(int8[name], ref[name]).min() >= 0.985, name
        assert cosine_rows(int8[name], ref[name]).mean() >= 0.998, name


def test_an_int8_row_does_not_depend_on_its_batch(model_dir, tmp_path):
    """Activations are quantized per token, not per batch: a text encoded alone gets the
    vector it gets among 240 others (under ONNX Runtime's per-batch dynamic quantization
    the worst of these moved to cosine 0.979, and no row kept its bytes)."""
    from pipeline.drift import canary_texts

    canary = canary_texts()
    enc = Encoder(ModelConfig(backend="onnx-int8", onnx_cache=str(tmp_path)),
                  (OutputSpec(name="e", dim=384),))
    together = enc.encode_float(canary)[0]["e"]
    alone = np.concatenate([enc.encode_float([t])[0]["e"] for t in canary[::8]])
    assert cosine_rows(alone, together[::8]).min() >= 0.99999


def test_an_architecture_that_does_not_export_is_refused_before_spark(tiny, tmp_path):
    from pipeline.preflight import preflight

    (tmp_path / "src").mkdir()
    raw = {"source": {"path": str(tmp_path / "src"), "format": "parquet"},
           "sink": {"path": str(tmp_path / "out")}, "outputs": [{"name": "e", "dim": 64}],
           "model": {"name_or_path": tiny["gemma3_dense"], "backend": "onnx-int8",
                     "onnx_cache": str(tmp_path / "cache")}}
    with pytest.raises(ModelError, match=r"gemma3_text\) does not export to ONNX.*"
                                         r"model\.backend: torch") as err:
        preflight(parse_config(raw))
    assert "\n" not in str(err.value) and err.value.exit_code == 4
    raw["model"] = {"backend": "onnx", "device": "cuda"}
    with pytest.raises(ConfigError, match=r"model\.backend.*CPU only"):
        parse_config(raw)


_PREPARE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from pipeline.config import ModelConfig, OutputSpec
from pipeline.encoder import onnx
from pipeline.encoder.model import fingerprint, inspect_model
info = inspect_model(sys.argv[1])
cfg = ModelConfig(name_or_path=sys.argv[1], backend="onnx-int8", onnx_cache=sys.argv[2])
print(onnx.prepare(cfg, info, [OutputSpec(name="e", dim=8)], fingerprint(info)))
"""


def test_two_workers_export_once_and_the_files_are_the_same_every_time(tiny, tmp_path):
    """Two processes at once on one cache: one exports (under the lock), the other waits
    for it; a second cache gets the same bytes (export and quantization are
    deterministic); a changed model (its fingerprint) gets graphs of its own."""
    model = tiny["bert_cls"]
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, model, str(tmp_path / "a")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(err.count("exporting") for _, err in outs) == 1, [e for _, e in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    again = subprocess.run([sys.executable, "-c", _PREPARE, model, str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=300, check=True)
    digest = {hashlib.sha256(Path(p).read_bytes()).hexdigest()
              for p in (paths.pop(), again.stdout.strip())}
    assert len(digest) == 1
    copy = tmp_path / "edited"
    shutil.copytree(model, copy)
    (copy / "1_Pooling" / "config.json").write_text(
        (copy / "1_Pooling" / "config.json").read_text().replace('"cls"', '"mean"'))
    edited = subprocess.run([sys.executable, "-c", _PREPARE, str(copy), str(tmp_path / "a")],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "exporting" in edited.stderr
    assert len(list((tmp_path / "a").glob("*.int8.onnx"))) == 2


def test_a_table_records_its_backend_and_refuses_the_other(spark, tiny, demo_source,
                                                          tmp_path):
    """An onnx-int8 table: runtime cpu/int8/onnx in the summary, the parity check against
    sentence-transformers fp32 at the int8 floor (0.97), the canary's baseline from
    int8 (a second int8 run: same runtime), search encodes queries with the same
    backend; a torch run into it is refused (exit 5), and the reverse."""
    from pipeline import search
    from pipeline.run import run

    cache = f"onnx_cache: '{tmp_path / 'cache'}'"
    model = f"name_or_path: '{tiny['bert_cls']}'"
    int8_cfg = write_config(tmp_path, demo_source, str(tmp_path / "int8"), drift=True,
                            parity=True, outputs="[{name: e, dim: 32}]",
                            extra=f"model: {{{model}, backend: onnx-int8, {cache}}}\n"
                                  "drift: {distribution: {enabled: false}}")
    first = run(load_config(int8_cfg), spark=spark)
    assert first.runtime == "cpu/int8/onnx" and first.rows_embedded > 0
    assert first.parity.startswith("passed") and "threshold 0.97" in first.parity
    # every row again (overwrite, the same identity): the canary baseline was int8's
    second = run(load_config(int8_cfg, ["sink.mode=overwrite"]), spark=spark)
    assert second.canary is not None and second.canary.verdict == "same_runtime", \
        second.canary_summary
    with pytest.raises(SinkConflictError, match="backend=onnx-int8, this run has "
                                                "backend=<none>"):
        run(load_config(int8_cfg, ["model.backend=torch"]), spark=spark)
    (tmp_path / "t").mkdir()
    torch_cfg = write_config(tmp_path / "t", demo_source, str(tmp_path / "torch"),
                             outputs="[{name: e, dim: 32}]", extra=f"model: {{{model}, {cache}}}")
    run(load_config(torch_cfg), spark=spark)
    with pytest.raises(SinkConflictError, match="backend"):
        run(load_config(torch_cfg, ["model.backend=onnx-int8"]), spark=spark)
    info = search.open_table(str(tmp_path / "int8"))
    enc = search.query_encoder(info, [info.specs["e"]], None, None)
    assert enc.runtime.label == "cpu/int8/onnx"


def test_an_onnx_cache_in_the_bucket_is_shared_by_the_nodes(tiny, s3_server, tmp_path):
    """model.onnx_cache in an object store: the first node exports the graph there (the
    driver's preflight, as a rule); another node, with a cache of its own, downloads the
    same bytes instead of exporting."""
    shared = s3_server.bucket("onnx-cache") + "/graphs"
    graphs = []
    for node in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", _PREPARE, tiny["bert_cls"], shared],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "EMBED_CACHE": str(tmp_path / node)})
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("exporting" in done.stderr) == (node == "a"), (node, done.stderr[-2000:])
        graphs.append(Path(done.stdout.strip()))
        assert graphs[-1].is_relative_to(tmp_path / node / "onnx")
    assert graphs[0].read_bytes() == graphs[1].read_bytes()
    names = {k.rsplit("/", 1)[1] for k in s3_server.objects("onnx-cache")}
    assert {graphs[0].name, graphs[0].name.replace(".int8.onnx", ".json")} <= names
