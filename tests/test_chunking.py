"""Passages: the chunker (offsets, sizes, overlaps, word cuts), split and late chunking
against references computed directly with sentence-transformers and transformers,
and the chunking config's errors. Spark-free; the real all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ChunkingConfig, ModelConfig, OutputSpec, parse_config
from pipeline.encoder import Encoder
from pipeline.encoder import chunking as chunker
from pipeline.errors import ConfigError
from tests.conftest import cosine_rows

SPECS = (OutputSpec(name="e", dim=384), OutputSpec(name="e64", dim=64),
         OutputSpec(name="mid", dim=384, layer=3))
SCRIPTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It was not amused; it barked. " * 12,
    "cjk": "数据库索引可以加快查询速度。但是它们会占用更多的存储空间。日本語の文章も試します。" * 8,
    "emoji": "Deploy 🚀 done ✅ then coffee ☕️ and a family 👨‍👩‍👧 photo, flags 🇫🇷🇯🇵! " * 10,
    "combining": "Cafe\u0301 nai\u0308ve re\u0301sume\u0301 and Zo\u0308e ü Å. " * 14,
}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _doc(tokenizer, text: str) -> chunker.DocTokens:
    backend = tokenizer._tokenizer
    backend.no_truncation()
    return chunker.DocTokens.from_encoding(backend.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("boundary", ["tokens", "sentences"])
def test_offsets_slice_back_to_the_chunks_tokens(tokenizer, script, boundary):
    text = SCRIPTS[script]
    doc = _doc(tokenizer, text)
    cfg = ChunkingConfig(mode="split", max_tokens=24, overlap_tokens=6, boundary=boundary)
    chunks = chunker.plan_chunks(text, doc, cfg)
    assert len(chunks) > 3
    assert chunks[0].start == 0 and chunks[-1].end == len(doc)
    for c in chunks:
        piece = text[c.char_start:c.char_end]
        assert piece == piece.strip() and piece
        # cut between words: the passage re-tokenizes to exactly its tokens
        again = tokenizer(piece, add_special_tokens=False)["input_ids"]
        assert again == doc.ids[c.start:c.end].tolist(), (script, piece)
        assert 0 < c.n_tokens <= cfg.max_tokens


def test_chunks_overlap_by_overlap_tokens_and_cover_the_text(tokenizer):
    # every token of this text starts a word: overlaps are exact
    text = " ".join(["alpha", "beta", "gamma", "delta", "kappa"] * 80)
    doc = _doc(tokenizer, text)
    assert doc.word_starts.all()
    for max_tokens, overlap in ((32, 0), (32, 8), (50, 25), (7, 3)):
        cfg = ChunkingConfig(mode="split", max_tokens=max_tokens, overlap_tokens=overlap)
        chunks = chunker.plan_chunks(text, doc, cfg)
        assert all(c.n_tokens <= max_tokens for c in chunks)
        assert all(c.n_tokens == max_tokens for c in chunks[:-1])
        for a, b in zip(chunks, chunks[1:], strict=False):
            assert a.end - b.start == overlap
        assert chunks[-1].end == len(doc)


def test_word_pieces_stay_together_and_sentences_end_chunks(tokenizer):
    text = ("Internationalization and electroencephalography are long words. "
            "Short one. Another sentence follows here, with several words in it.") * 6
    doc = _doc(tokenizer, text)
    assert not doc.word_starts.all()  # word pieces
    chunks = chunker.plan_chunks(text, doc, ChunkingConfig(mode="split", max_tokens=20,
                                                           overlap_tokens=4))
    for c in chunks[1:]:
        assert doc.word_starts[c.start]
    by_sentence = chunker.plan_chunks(text, doc, ChunkingConfig(
        mode="split", max_tokens=40, overlap_tokens=0, boundary="sentences"))
    ends = [text[c.char_start:c.char_end][-1] for c in by_sentence[:-1]]
    assert set(ends) == {"."}, ends  # each ends at a sentence end inside its window


def test_a_word_longer_than_the_window_is_cut_inside(tokenizer):
    text = "x" + "ab" * 200 + " end"
    doc = _doc(tokenizer, text)
    chunks = chunker.plan_chunks(text, doc, ChunkingConfig(mode="split", max_tokens=16,
                                                           overlap_tokens=0))
    assert all(c.n_tokens <= 16 for c in chunks) and chunks[-1].end == len(doc)


@pytest.fixture(scope="module")
def long_docs(demo_rows):
    texts = sorted((r["text"] for r in demo_rows), key=len, reverse=True)[:12]
    return texts + ["Tiny.", SCRIPTS["cjk"], SCRIPTS["emoji"]]


def test_split_equals_sentence_transformers_on_the_chunk_texts(model_dir, long_docs):
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    cfg = ChunkingConfig(mode="split", max_tokens=96, overlap_tokens=16, boundary="sentences")
    enc = Encoder(ModelConfig(), SPECS, chunking=cfg)
    enc.max_batch_rows = 7  # chunks of one document land in several batches
    result = enc.encode(long_docs)
    rows = result.chunks
    assert rows is not None and len(rows.doc) > 3 * len(long_docs)
    pieces = [long_docs[d][s:e] for d, s, e in zip(rows.doc, rows.char_start, rows.char_end,
                                                   strict=True)]
    st = SentenceTransformer(str(model_dir), device="cpu")
    ref = st.encode(pieces, batch_size=32, convert_to_numpy=True)
    ours = np.stack(result.columns["e"].to_numpy(zero_copy_only=False))
    assert cosine_rows(ours, ref).min() >= 0.9999
    ours64 = np.stack(result.columns["e64"].to_numpy(zero_copy_only=False))
    assert cosine_rows(ours64, ref[:, :64]).min() >= 0.9999
    # rows are each document's chunks in order, with their counts
    for d in range(len(long_docs)):
        mine = rows.doc == d
        assert rows.chunk_index[mine].tolist() == list(range(int(mine.sum())))
        assert set(rows.chunk_count[mine].tolist()) == {int(mine.sum())}
    assert rows.n_tokens.max() <= 96


def _late_reference(model_dir, text: str, chunks, layer: int | None) -> np.ndarray:
    """One forward pass of the whole document with transformers, then each chunk's
    token-span mean ([CLS] shifts the document's tokens by one), normalized."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    inputs = tok(text, return_tensors="pt", truncation=False)
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    states = out.hidden_states[layer] if layer else out.last_hidden_state
    vecs = np.stack([states[0, 1 + c.start:1 + c.end].mean(0).numpy() for c in chunks])
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


@pytest.mark.parametrize("attention", ["auto", "sdpa"])  # packed varlen, padded
def test_late_chunking_equals_full_forward_then_span_means(model_dir, tokenizer, long_docs,
                                                           attention):
    cfg = ChunkingConfig(mode="late", max_tokens=64, overlap_tokens=8)
    enc = Encoder(ModelConfig(max_length=512, attention=attention), SPECS, chunking=cfg)
    assert enc.packed == (attention == "auto")
    docs = [d for d in long_docs if len(tokenizer(d)["input_ids"]) <= 512][:6]
    assert len(docs) >= 4
    enc.max_batch_rows = 2
    floats, info = enc.encode_float(docs)
    rows = info.chunks
    for d, text in enumerate(docs):
        chunks = chunker.plan_chunks(text, _doc(tokenizer, text), cfg)
        mine = rows.doc == d
        assert rows.char_start[mine].tolist() == [c.char_start for c in chunks]
        for name, layer in (("e", None), ("mid", 3)):
            ref = _late_reference(model_dir, text, chunks, layer)
            assert cosine_rows(floats[name][mine], ref).min() >= 0.9999, (d, name)


def test_late_chunking_of_documents_longer_than_the_window(tokenizer):
    text = SCRIPTS["ascii"] * 6  # ~1,900 tokens: macro-windows of 128
    cfg = ChunkingConfig(mode="late", max_tokens=48, overlap_tokens=8)
    enc = Encoder(ModelConfig(max_length=128), SPECS[:1], chunking=cfg)
    prep = enc.prepare([text])
    doc = _doc(tokenizer, text)
    chunks = chunker.plan_chunks(text, doc, cfg)
    assert prep.n_rows == len(chunks) and len(prep.lengths) > 10
    assert prep.lengths.max() <= 128
    # every chunk's span holds exactly its own tokens, inside one window
    for r, c in enumerate(chunks):
        unit, lo, hi = prep.spans.unit[r], prep.spans.start[r], prep.spans.end[r]
        window = prep.flat[prep.offsets[unit]:prep.offsets[unit] + prep.lengths[unit]]
        assert window[lo:hi].tolist() == doc.ids[c.start:c.end].tolist()
    floats, _ = enc.encode_float([text, "short text"])
    assert floats["e"].shape == (len(chunks) + 1, 384)
    np.testing.assert_allclose(np.linalg.norm(floats["e"], axis=1), 1.0, atol=1e-5)


def test_macro_windows_hold_each_chunk_with_context():
    chunks = [chunker.Chunk(s, min(s + 10, 100), 0, 0) for s in range(0, 100, 8)]
    windows, owner = chunker.macro_windows(chunks, 100, 32, chunker.late_context(32, 10))
    for c, w in zip(chunks, owner, strict=True):
        a, b = windows[w]
        assert a <= c.start and c.end <= b and b - a <= 32
    assert windows[0][0] == 0 and windows[-1][1] == 100


def _raw(chunking: str, model: str = "", outputs: str = "[{name: e, dim: 8}]") -> dict:
    import yaml

    return yaml.safe_load(
        f"source: {{path: /tmp/x}}\nsink: {{path: /tmp/y}}\noutputs: {outputs}\n"
        f"chunking: {chunking}\n" + (f"model: {model}\n" if model else ""))


@pytest.mark.parametrize("chunking, model, outputs, key, words", [
    ("{mode: split, max_tokens: 300}", "", None, "chunking.max_tokens", "max_length = 256"),
    ("{mode: split, max_tokens: 0}", "", None, "chunking.max_tokens", "positive integer, got 0"),
    ("{mode: split, max_tokens: 64, overlap_tokens: 40}", "", None, "chunking.overlap_tokens",
     "max_tokens / 2 = 32"),
    ("{mode: split, overlap_tokens: -1}", "", None, "chunking.overlap_tokens", "got -1"),
    ("{mode: sliding}", "", None, "chunking.mode", "none, split, late"),
    ("{mode: split, boundary: paragraphs}", "", None, "chunking.boundary", "tokens, sentences"),
    ("{mode: late}", "{pooling: cls}", None, "model.pooling", "mean-pools"),
    ("{mode: late}", "", "[{name: e, dim: 8, pooling: last_token}]", "outputs[0].pooling",
     "mean-pools"),
    ("{mode: split}", "{long_text: chunk}", None, "model.long_text", "leave long_text"),
    ("{mode: split, size: 3}", "", None, "chunking.size", "unknown key"),
])
def test_bad_chunking_config_one_line_errors(chunking, model, outputs, key, words):
    from pipeline.preflight import preflight

    with pytest.raises(ConfigError) as err:  # at load, or once the model's own are known
        preflight(parse_config(_raw(chunking, model, outputs or "[{name: e, dim: 8}]")))
    assert err.value.key == key and words in str(err.value)
    assert "\n" not in str(err.value)


def test_store_chunk_text_needs_chunking():
    raw = _raw("{mode: none}")
    raw["sink"]["store_chunk_text"] = True
    with pytest.raises(ConfigError, match="only applies to chunked tables"):
        parse_config(raw)


def test_window_checks_name_the_key(model_dir):
    from pipeline.preflight import preflight

    cfg = parse_config(_raw("{mode: late, max_tokens: 512}", "{max_length: 512}"))
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert err.value.key == "chunking.max_tokens" and "at most 510" in str(err.value)
    with pytest.raises(ConfigError) as err:
        Encoder(ModelConfig(max_length=1024), SPECS[:1],
                chunking=ChunkingConfig(mode="late", max_tokens=64))
    assert err.value.key == "model.max_length" and "512 positions" in str(err.value)


def test_every_shipped_config_loads():
    from pipeline.config import load_config
    from tests.conftest import ROOT

    configs = sorted((ROOT / "conf").glob("*.yaml"))
    assert any(p.name == "passages.yaml" for p in configs)
    for path in configs:
        cfg = load_config(path)
        assert cfg.outputs, path
    passages = load_config(ROOT / "conf" / "passages.yaml")
    assert passages.chunking.mode == "late" and passages.sink.store_chunk_text


def test_embed_validate_checks_the_chunking_without_spark(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main
    from tests.conftest import ROOT

    conf = str(ROOT / "conf" / "passages.yaml")
    source = ["--set", f"source.path={tmp_path}", "--set", "source.format=parquet"]
    ok = CliRunner().invoke(main, ["validate", "--config", conf, *source])
    assert ok.exit_code == 0, ok.output
    assert "passages: late 128 tokens / 16 overlap" in ok.output
    bad = CliRunner().invoke(main, ["validate", "--config", conf, *source,
                                    "--set", "chunking.max_tokens=512"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1] == (
        "error: config error at 'chunking.max_tokens': 512 tokens + 2 special and prompt "
        "tokens exceed model.max_length 512: at most 510")
