"""Bring your own model: a directory is read as sentence-transformers reads it, and every
family users run embeds exactly as the library embeds it.

The models are tiny random-weight ones of each family, built and saved with
sentence-transformers' own classes (tests/model_families.py); the reference is
``SentenceTransformer(dir).encode`` itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, OutputSpec, load_config
from pipeline.encoder import Encoder
from pipeline.encoder.model import fingerprint, inspect_model, legacy_fingerprint, resolve
from pipeline.errors import ModelError, SinkConflictError
from tests import model_families
from tests.conftest import cosine_rows, write_config

PACKED = {"bert_cls", "bert_dense", "xlmr_prompts", "modernbert", "qwen3_last", "gemma3_dense"}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, str]:
    return model_families.build_all(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def texts(demo_rows) -> list[str]:
    """Docstrings, most longer than the models' 64 tokens, and a few short ones."""
    return [r["text"] for r in demo_rows[:48]] + ["x", "Return the sum.", "数字 🙂"]


def _st(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", local_files_only=True)


@pytest.mark.parametrize("family", model_families.FAMILIES)
def test_each_family_equals_sentence_transformers_encode(families, texts, family):
    torch.set_num_threads(2)
    st = _st(families[family])
    ref = st.encode(texts, convert_to_numpy=True)
    width = ref.shape[1]
    enc = Encoder(ModelConfig(name_or_path=families[family]),
                  (OutputSpec(name="full", dim=width), OutputSpec(name="half", dim=width // 2)))
    floats, _ = enc.encode_float(texts)
    assert enc.warnings == ()  # the config named the directory only
    assert enc.max_length == model_families.MAX_SEQ == st.max_seq_length
    assert cosine_rows(floats["full"], ref).min() >= 0.9999, family
    assert cosine_rows(floats["half"], ref[:, : width // 2]).min() >= 0.9999, family
    # texts past the max length are cut as sentence-transformers cuts them
    assert (enc.tokenize(texts)[2] == model_families.MAX_SEQ).sum() >= 8
    assert (enc.runtime.attention == "varlen") == (family in PACKED)


def test_xlm_roberta_runs_packed_with_positions_after_the_padding_index(families, texts):
    path = families["xlmr_prompts"]
    packed = Encoder(ModelConfig(name_or_path=path), (OutputSpec(name="e", dim=32),))
    padded = Encoder(ModelConfig(name_or_path=path, attention="sdpa"),
                     (OutputSpec(name="e", dim=32),))
    assert packed.packed and packed.position_offset == 2  # <pad> = 1
    assert cosine_rows(packed.encode_float(texts)[0]["e"],
                       padded.encode_float(texts)[0]["e"]).min() >= 0.9999


def test_the_head_applies_to_every_column_and_bounds_the_dims(families, texts):
    """A Dense head widening 32 -> 96: columns up to 96 dims; a 2D Matryoshka column at
    layer 1 gets the same head over its layer's pooled vector."""
    path = families["bert_dense"]
    info = inspect_model(path)
    assert info.hidden_size == 32 and info.output_dim() == 96
    enc = Encoder(ModelConfig(name_or_path=path),
                  (OutputSpec(name="wide", dim=96), OutputSpec(name="l1", dim=96, layer=1)))
    floats, _ = enc.encode_float(texts[:8])
    # layer 1's hidden states -> pooling (prompt left out) -> the same Dense + Normalize
    from pipeline.encoder.model import pool

    batch = enc.tokenizer([enc.prompt + t for t in texts[:8]], padding=True, truncation=True,
                          max_length=enc.max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = enc.model(**batch, output_hidden_states=True).hidden_states[1]
    pooled = pool(hidden, batch["attention_mask"], "mean", enc.prompt_skip).numpy()
    assert enc.prompt_skip > 1  # the prompt's tokens (and [CLS]) are out of the mean
    assert cosine_rows(floats["l1"], enc.head.apply(pooled)).min() >= 0.9999
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError
    from pipeline.preflight import preflight

    raw = {"source": {"path": str(Path(path)), "format": "parquet"}, "sink": {"path": "/tmp/o"},
           "model": {"name_or_path": path}, "outputs": [{"name": "e", "dim": 97}]}
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.dim.*97.*output dimension 96 after "
                                          r"its Dense head"):
        preflight(parse_config(raw))


def test_defaults_come_from_the_model_and_overrides_are_warned(families):
    info = inspect_model(families["gemma3_dense"])
    stack = info.modules
    assert stack.kind == "sentence-transformers" and stack.pooling == "mean"
    assert [d.out_features for d in stack.dense] == [128, 64] and stack.normalize
    own = resolve(ModelConfig(name_or_path=families["gemma3_dense"]), info)
    assert (own.cfg.pooling, own.cfg.max_length, own.cfg.prompt) == (
        "mean", 64, "title: none | text: ") and own.warnings == ()
    assert stack.query_prompt() == "task: search result | query: "
    set_ = resolve(ModelConfig(name_or_path=families["gemma3_dense"], pooling="cls",
                               max_length=32, prompt=""), info)
    assert set_.cfg.pooling == "cls" and len(set_.warnings) == 3
    assert "model.pooling: cls set, the model's own is mean" in set_.warnings[0]
    # a plain Hugging Face directory: mean pooling, the tokenizer's window
    plain = inspect_model(str(Path(families["bert_cls"]).parent / "bert_cls_hf"))
    assert plain.modules.kind == "transformers"
    assert resolve(ModelConfig(name_or_path=str(plain.path)), plain).cfg.pooling == "mean"
    assert plain.default_max_length == 512


def test_validate_prints_the_resolved_stack(families, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "src").mkdir()
    cfg = write_config(tmp_path, str(tmp_path / "src"), str(tmp_path / "out"), fmt="parquet",
                       outputs="[{name: e, dim: 64}]",
                       extra=f"model: {{name_or_path: '{families['gemma3_dense']}'}}")
    out = CliRunner().invoke(main, ["validate", "--config", str(cfg), "--set",
                                    "model.max_length=48"])
    assert out.exit_code == 0, out.output
    assert "Transformer -> Pooling(mean) -> Dense(64->128, identity) -> Dense(128->64, " \
           "identity) -> Normalize" in out.output
    assert "document prompt: 'title: none | text: '" in out.output
    assert "warning: model.max_length: 48 set, the model's own is 64" in out.output


def _copy(src: str, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda d: _modules(d, lambda m: m + [{"idx": 9, "name": "9", "path": "9_LayerNorm",
                                           "type": "sentence_transformers.models.LayerNorm"}]),
     r"model module sentence_transformers\.models\.LayerNorm at .*modules\.json entry 4 "
     r"\(.*9_LayerNorm\) is not one the engine can run"),
    (lambda d: _modules(d, lambda m: [m[0], m[2], m[1], *m[3:]]),
     r"Dense at .*entry 1.*not one the engine can run"),
    (lambda d: _json(d / "sentence_bert_config.json",
                     lambda c: {**c, "processing_kwargs": {"text": {"max_length": 9}}}),
     r"sentence_bert_config\.json sets processing_kwargs"),
    (lambda d: _json(d / "2_Dense" / "config.json",
                     lambda c: {**c, "activation_function": "my.lib.Swish"}),
     r"activation 'my\.lib\.Swish', which is not a torch class"),
    (lambda d: (d / "2_Dense" / "model.safetensors").rename(d / "2_Dense" / "pytorch_model.bin"),
     r"Dense module at .* has only pickle weights"),
    (lambda d: _json(d / "1_Pooling" / "config.json", lambda c: {**c, "pooling_mode": "median"}),
     r"pooling mode 'median' in .*1_Pooling/config\.json"),
])
def test_a_module_the_engine_cannot_run_is_refused_in_one_line(families, tmp_path, edit,
                                                               pattern):
    copy = _copy(families["bert_dense"], tmp_path / "m")
    edit(copy)
    with pytest.raises(ModelError, match=pattern) as err:
        inspect_model(str(copy))
    assert "\n" not in str(err.value) and err.value.exit_code == 4


def _json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _modules(folder: Path, change) -> None:
    _json(folder / "modules.json", change)


def test_fingerprint_covers_configs_tokenizer_and_head(families, tmp_path, model_dir):
    copy = _copy(families["bert_dense"], tmp_path / "m")
    seen = {fingerprint(inspect_model(str(copy)))}
    for edit in (lambda: _json(copy / "1_Pooling" / "config.json",
                               lambda c: {**c, "pooling_mode": "cls"}),
                 lambda: _json(copy / "config_sentence_transformers.json",
                               lambda c: {**c, "prompts": {**c["prompts"], "document": "d: "}}),
                 lambda: _json(copy / "tokenizer_config.json",
                               lambda c: {**c, "model_max_length": 32}),
                 lambda: (copy / "2_Dense" / "model.safetensors").write_bytes(
                     (copy / "2_Dense" / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")):
        edit()
        seen.add(fingerprint(inspect_model(str(copy))))
    assert len(seen) == 5  # every edit moved it
    # the weights-only fingerprint of earlier releases, as they computed it
    import hashlib

    info = inspect_model(str(model_dir))
    digest = hashlib.sha256()
    for f in info.weight_files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    assert legacy_fingerprint(info) == digest.hexdigest() != fingerprint(info)


def test_parity_check_passes_for_a_family_and_names_the_cause_of_a_failure(families):
    from pipeline.drift import canary_texts
    from pipeline.encoder import parity

    texts = parity.canary_slice(canary_texts())
    assert len(texts) == 32 and max(map(len, canary_texts())) == max(map(len, texts))
    enc = Encoder(ModelConfig(name_or_path=families["bert_dense"]),
                  parity.parity_outputs(inspect_model(families["bert_dense"])))
    passed = parity.check(enc, texts)
    assert passed.status == "passed" and passed.min_cosine >= 0.9999
    assert passed.reference.startswith("sentence-transformers 6")
    # the head gone wrong (another activation): the check fails and says where to look
    enc.head.layers[0].activation = torch.nn.Identity()
    failed = parity.check(enc, texts)
    assert failed.status == "failed" and failed.min_cosine < 0.9999
    assert "Dense head" in failed.cause
    with pytest.raises(ModelError, match=r"parity check failed for model m.*nothing was "
                                         r"written") as err:
        parity.enforce(failed, "m")
    assert err.value.exit_code == 4


# --------------------------------------------------------------------------- Spark + Delta


@pytest.fixture(scope="module")
def family_source(spark, tmp_path_factory, texts) -> str:
    import pandas as pd

    path = str(tmp_path_factory.mktemp("family_src") / "src")
    frame = pd.DataFrame({"id": np.arange(len(texts), dtype=np.int64), "text": texts})
    spark.createDataFrame(frame).write.format("delta").save(path)
    return path


@pytest.mark.parametrize("family", model_families.FAMILIES)
def test_a_config_naming_only_the_directory_lands_sentence_transformers_vectors(
        spark, families, family_source, texts, tmp_path, family):
    """Spark -> Delta with ``model: {name_or_path: DIR}``: the stored vectors equal
    ``encode``; ``embed search`` scores equal ``encode_query`` against them; a run that
    resolves the model otherwise is refused (exit 5). Two families also run the parity
    check at table creation, recorded in the runs table and the table's identity."""
    from pipeline import deltars, search
    from pipeline.run import run

    parity = family in ("gemma3_dense", "xlmr_prompts")
    st = _st(families[family])
    width = st.get_embedding_dimension()
    out = str(tmp_path / "out")
    cfg_path = write_config(tmp_path, family_source, out, parity=parity,
                            outputs=f"[{{name: e, dim: {width}}}]",
                            extra=f"model: {{name_or_path: '{families[family]}'}}")
    result = run(load_config(cfg_path), spark=spark)
    assert result.rows_embedded == len(texts) and result.warnings == []
    table = deltars.dataset(out).to_table(columns=["id", "e"]).to_pandas().sort_values("id")
    stored = np.stack(table["e"].to_numpy()).astype(np.float32)
    ref = st.encode([texts[i] for i in table["id"]], convert_to_numpy=True)
    assert cosine_rows(stored, ref).min() >= 0.9999, family
    identity = search.open_table(out).identity
    assert identity["model_path"] == str(Path(families[family]).resolve())
    assert ("head" in identity) == (family in ("bert_dense", "gemma3_dense"))
    if parity:
        assert result.parity.startswith("passed: min cosine")
        assert json.loads(identity["parity"])["status"] == "passed"
    query = "how do I read a file line by line"
    found = search.search(out, "e", query, search.SearchOptions(k=5, snippets=False))
    q = st.encode_query([query], convert_to_numpy=True)[0]
    scores = stored @ q / np.linalg.norm(stored, axis=1) / np.linalg.norm(q)
    by_id = dict(zip(table["id"].tolist(), scores.tolist(), strict=True))
    # each hit scores as encode_query scores it, and the hits are the best five (ties of
    # random weights may swap places within 1e-4)
    np.testing.assert_allclose([h.score for h in found.hits],
                               [by_id[h.id] for h in found.hits], atol=1e-4)
    np.testing.assert_allclose([h.score for h in found.hits], np.sort(scores)[::-1][:5],
                               atol=1e-4)
    if family == "gemma3_dense":  # another resolution of the same model: refused
        with pytest.raises(SinkConflictError, match="pooling=mean, this run has pooling=cls"):
            run(load_config(cfg_path, ["model.pooling=cls"]), spark=spark)
