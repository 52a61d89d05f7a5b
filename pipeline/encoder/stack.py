"""A model directory read the way sentence-transformers reads it: its module stack.

``modules.json`` lists the modules in order; each is a folder with its own
config. The engine runs these:

    Transformer (sentence_bert_config.json: max_seq_length, do_lower_case)
      -> Pooling (1_Pooling/config.json: cls, mean, max, lasttoken, weightedmean,
         mean_sqrt_len_tokens, or several concatenated; include_prompt)
      -> Dense* (in/out features, bias, activation, weights)
      -> Normalize

plus ``config_sentence_transformers.json`` (prompts, default_prompt_name,
similarity_fn_name). Anything else in ``modules.json`` is refused with one
line naming the module type and its file: a model the engine cannot run is
never encoded another way. A directory without ``modules.json`` is a plain
Hugging Face model: sentence-transformers runs it with mean pooling and so
does the engine (unless the config says otherwise).

JSON only, no torch: the driver's preflight reads this before Spark starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ModelError

# sentence-transformers' pooling names -> the engine's (lasttoken is last_token)
ST_POOLING = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last_token",
              "weightedmean": "weightedmean", "mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}
ENGINE_TO_ST_POOLING = {v: k for k, v in ST_POOLING.items()}
# legacy boolean keys, in the order sentence-transformers concatenates them
_LEGACY_POOLING = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                   ("pooling_mode_mean_tokens", "mean"),
                   ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                   ("pooling_mode_weightedmean_tokens", "weightedmean"),
                   ("pooling_mode_lasttoken", "lasttoken"))
# Position ids of these families start after the padding index (RoBERTa's rule).
PADDING_OFFSET_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet", "longformer",
                                  "data2vec-text", "xmod", "xlm-roberta-xl", "luke"})
SBERT_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json",
                 "sentence_distilbert_config.json", "sentence_camembert_config.json",
                 "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                 "sentence_xlnet_config.json")
DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # encode_document's order
IDENTITY_ACTIVATIONS = frozenset({"torch.nn.modules.linear.Identity", "torch.nn.Identity"})
Kind = Literal["sentence-transformers", "transformers"]
SPLADE_STRATEGIES = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")
ST_SPARSE = "sentence_transformers.sparse_encoder.modules."


@dataclass(frozen=True)
class SpladeSpec:
    """A SparseEncoder's SpladePooling: ``log(1 + relu(logits))`` (``log1p_relu``: log1p
    once more) over the MLM head's vocabulary logits, max- or sum-pooled over tokens.
    ``query_weights``: an inference-free model's query side (a Router whose query route is
    a SparseStaticEmbedding: a weight per vocabulary token, e.g. IDF), else None (queries
    run the document side with the query prompt)."""

    folder: Path
    strategy: str = "max"
    activation: str = "relu"
    query_weights: Path | None = None
    query_tokenizer: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {"splade": self.strategy, "activation": self.activation,
                **({"query": "static"} if self.query_weights else {})}


@dataclass(frozen=True)
class DenseSpec:
    """One Dense module: ``activation(x @ W.T + b)`` (+ x, or a projection of x, with
    ``use_residual``)."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # the torch class path sentence-transformers saved
    residual: bool
    weights: Path

    def describe(self) -> dict[str, Any]:
        act = self.activation.rsplit(".", 1)[-1].lower()
        return {"dense": [self.in_features, self.out_features], "bias": self.bias,
                "activation": act, **({"residual": True} if self.residual else {})}


@dataclass(frozen=True)
class ModelStack:
    """What a directory says about how its vectors are made (see the module doc)."""

    root: Path
    kind: Kind
    transformer_dir: Path  # the Transformer module's folder (usually the root)
    transformer_task: str = "feature-extraction"
    max_seq_length: int | None = None  # as the directory states it (None: the window)
    do_lower_case: bool = False
    # sentence_bert_config.json's model_args / tokenizer_args / config_args: keywords
    # sentence-transformers passes to from_pretrained (the engine passes them too)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: str | None = None  # engine names, '+'-joined when concatenated; None: unsaid
    include_prompt: bool = True
    dense: tuple[DenseSpec, ...] = ()
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None
    config_files: tuple[Path, ...] = ()  # every config that shapes the vectors
    splade: SpladeSpec | None = None  # a SparseEncoder: its vectors are sparse (SPLADE)
    max_active_dims: int | None = None  # a SparseEncoder's own top-k (its config)

    def document_prompt(self) -> str:
        """The prompt rows get: the one sentence-transformers' ``encode`` applies (the
        model's default_prompt_name), else, where the model names no default, the one
        ``encode_document`` applies (its document / passage / corpus prompt), else none."""
        if self.default_prompt_name:
            return self.default_prompt()
        for name in DOCUMENT_PROMPTS:
            if name in self.prompts:
                return self.prompts[name]
        return ""

    def query_prompt(self) -> str:
        """``encode_query``'s prompt: the model's query prompt, else its default one."""
        return self.prompts["query"] if "query" in self.prompts else self.default_prompt()

    def default_prompt(self) -> str:
        if self.default_prompt_name:
            return self.prompts.get(self.default_prompt_name, "")
        return ""

    @property
    def sparse(self) -> bool:
        return self.splade is not None

    def output_dim(self, hidden_size: int, pooling: str | None = None) -> int:
        """The vector's width after pooling (``pooling``, else the model's) and Dense."""
        if self.dense:
            return self.dense[-1].out_features
        return hidden_size * len((pooling or self.pooling or "mean").split("+"))

    def head(self) -> list[dict[str, Any]] | None:
        """The modules after pooling, for the table's identity (None: Normalize at most)."""
        if not self.dense:
            return None
        return [d.describe() for d in self.dense] + ([{"normalize": True}]
                                                     if self.normalize else [])

    def modules_line(self, pooling: str, hidden: int) -> str:
        """e.g. ``Transformer -> Pooling(cls) -> Dense(768->3072, tanh) -> Normalize``."""
        if self.splade is not None:
            sp = self.splade
            query = "; queries: static weights" if sp.query_weights else ""
            return f"Transformer(fill-mask) -> SpladePooling({sp.strategy}, " \
                   f"{sp.activation}) ({self.kind}; sparse over the vocabulary{query})"
        parts = ["Transformer", f"Pooling({pooling}"
                 + ("" if self.include_prompt else ", prompt excluded") + ")"]
        parts += [f"Dense({d.in_features}->{d.out_features}, {d.describe()['activation']})"
                  for d in self.dense]
        parts += ["Normalize"] if self.normalize else []
        return " -> ".join(parts) + f" ({self.kind}; dims {hidden} -> "\
            f"{self.output_dim(hidden, pooling)})"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def read_stack(root: Path, allow_pickle: bool = False) -> ModelStack:
    """The directory's module stack; a plain Hugging Face directory has none."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return ModelStack(root=root, kind="transformers", transformer_dir=root)
    entries = read_json(modules_file)
    if not isinstance(entries, list) or not entries:
        raise ModelError(f"{modules_file} lists no modules")
    fields: dict[str, Any] = {"config_files": [modules_file], "dense": []}
    if len(entries) == 1 and _module_class(entries[0]) == "Router":
        _read_router(root, fields)
    else:
        for position, entry in enumerate(entries):  # in the file's order, as the library runs them
            _read_module(root, entry, position, fields, allow_pickle)
    if "transformer_dir" not in fields:
        raise ModelError(f"{modules_file} has no Transformer module")
    if fields.get("transformer_task", "feature-extraction") != "feature-extraction" \
            and "splade" not in fields:
        raise ModelError(f"the Transformer module at {fields['transformer_dir']} is a "
                         f"{fields['transformer_task']} model (its sentence_bert_config.json "
                         "says transformer_task) with no SpladePooling after it; the engine "
                         "runs feature-extraction models, and fill-mask ones as SparseEncoders")
    _read_st_config(root, fields)
    fields["dense"] = tuple(fields["dense"])
    fields["config_files"] = tuple(fields["config_files"])
    return ModelStack(root=root, kind="sentence-transformers", **fields)


def _module_class(entry: dict) -> str:
    return str(entry.get("type", "?")).rsplit(".", 1)[-1]


def _read_module(root: Path, entry: dict, position: int, fields: dict[str, Any],
                 allow_pickle: bool) -> None:
    kind, folder = _module_class(entry), root / str(entry.get("path", ""))
    where = f"{root / 'modules.json'} entry {position} ({entry.get('type')}, " \
            f"{entry.get('path') or '.'})"
    if kind in ("Transformer", "MLMTransformer") and position == 0:
        _read_transformer(folder, fields, "fill-mask" if kind == "MLMTransformer" else None)
    elif kind == "SpladePooling" and position == 1 and \
            fields.get("transformer_task") == "fill-mask":
        fields["splade"] = _read_splade(folder)
        fields["config_files"] += [folder / "config.json"]
    elif kind == "Pooling" and "transformer_dir" in fields and "pooling" not in fields \
            and "splade" not in fields:
        _read_pooling(folder, fields)
    elif kind == "Dense" and "pooling" in fields and not fields.get("normalize"):
        fields["dense"].append(_read_dense(folder, where, allow_pickle))
        fields["config_files"] += [folder / "config.json"]
    elif kind == "Normalize" and "pooling" in fields:
        fields["normalize"] = True
    elif kind == "Dropout":  # the identity at inference
        pass
    else:
        raise ModelError(f"model module {entry.get('type')} at {where} is not one the engine "
                         "can run (it runs Transformer -> Pooling -> Dense* -> Normalize, in "
                         "that order); nothing was encoded")


def _read_transformer(folder: Path, fields: dict[str, Any], task: str | None = None) -> None:
    fields["transformer_dir"] = folder
    for name in SBERT_CONFIGS:
        path = folder / name
        if path.is_file():
            conf = read_json(path)
            fields["config_files"] += [path]
            break
    else:
        conf = {}
    task = task or conf.get("transformer_task", "feature-extraction")
    if task not in ("feature-extraction", "fill-mask"):
        raise ModelError(f"the Transformer module at {folder} is a {task} model (its "
                         "sentence_bert_config.json says transformer_task); the engine runs "
                         "feature-extraction models, and fill-mask ones as SparseEncoders")
    fields["transformer_task"] = task
    _refuse_unsupported(conf, path if conf else folder)
    tokenizer_args = _kwargs(conf, "tokenizer_args", "processor_kwargs")
    length = conf.get("max_seq_length") or tokenizer_args.get("model_max_length")
    if length is not None:
        fields["max_seq_length"] = int(length)
    fields["do_lower_case"] = bool(conf.get("do_lower_case", False))
    fields["tokenizer_kwargs"] = tokenizer_args
    fields["model_kwargs"] = {**_kwargs(conf, "config_args", "config_kwargs"),
                              **_kwargs(conf, "model_args", "model_kwargs")}


# from_pretrained keywords the engine decides itself (device, dtype, attention, code)
_OWN_KWARGS = frozenset({"trust_remote_code", "torch_dtype", "dtype", "attn_implementation",
                         "device_map", "local_files_only", "revision", "token", "cache_dir"})


def _kwargs(conf: dict[str, Any], *names: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in names:
        found.update(conf.get(name) or {})
    return {k: v for k, v in found.items() if k not in _OWN_KWARGS}


def _refuse_unsupported(conf: dict[str, Any], path: Path) -> None:
    """Transformer settings that change the vectors and that the engine does not run:
    refused here, never ignored."""
    modalities = conf.get("modality_config") or {"text": {}}
    if "text" not in modalities:
        raise ModelError(f"{path}: the Transformer module takes {', '.join(modalities)} "
                         "input, not text")
    processing = {k: v for k, v in (conf.get("processing_kwargs") or {}).items() if v}
    for key, value in (("processing_kwargs", processing),
                       ("query_length", conf.get("query_length")),
                       ("document_length", conf.get("document_length")),
                       ("query_expansion", conf.get("query_expansion"))):
        if value:
            raise ModelError(f"{path} sets {key} ({json.dumps(value)[:80]}), which the engine "
                             "does not apply; not run rather than encoded otherwise")


def _read_splade(folder: Path, query: Path | None = None) -> SpladeSpec:
    path = folder / "config.json"
    conf = read_json(path)
    strategy = conf.get("pooling_strategy", "max")
    activation = conf.get("activation_function", "relu")
    if strategy not in SPLADE_STRATEGIES or activation not in SPLADE_ACTIVATIONS:
        raise ModelError(f"{path}: SpladePooling {strategy}/{activation} is not one the engine "
                         f"runs (pooling_strategy {'/'.join(SPLADE_STRATEGIES)}, "
                         f"activation_function {'/'.join(SPLADE_ACTIVATIONS)})")
    weights = None if query is None else query / "model.safetensors"
    if weights is not None and not weights.is_file():
        raise ModelError(f"the SparseStaticEmbedding at {query} has no model.safetensors")
    return SpladeSpec(folder=folder, strategy=strategy, activation=activation,
                      query_weights=weights, query_tokenizer=query)


def _read_router(root: Path, fields: dict[str, Any]) -> None:
    """A Router: the engine runs the SparseEncoder layout of one (a document route of a
    fill-mask Transformer and SpladePooling; a query route that is the same modules, or a
    SparseStaticEmbedding: inference-free). Any other routing is refused."""
    path = root / "router_config.json"
    conf = read_json(path)
    fields["config_files"] += [path]
    types, routes = conf.get("types") or {}, conf.get("structure") or {}
    document = list(routes.get("document") or routes.get("passage") or [])
    query = list(routes.get("query") or [])
    kinds = [str(types.get(name, "?")).rsplit(".", 1)[-1] for name in document]
    if kinds != ["MLMTransformer", "SpladePooling"] and kinds != ["Transformer", "SpladePooling"]:
        raise ModelError(f"{path}: a Router whose document route is {' -> '.join(kinds) or 'empty'}"
                         " is not one the engine runs (it runs a SparseEncoder's Router: "
                         "Transformer(fill-mask) -> SpladePooling); nothing was encoded")
    query_kinds = [str(types.get(name, "?")).rsplit(".", 1)[-1] for name in query]
    static = None
    if query_kinds == ["SparseStaticEmbedding"]:
        static = root / query[0]
    elif query and query != document:
        raise ModelError(f"{path}: a query route of {' -> '.join(query_kinds)} is not one "
                         "the engine runs (SparseStaticEmbedding, or the document route)")
    _read_transformer(root / document[0], fields,
                      "fill-mask" if kinds[0] == "MLMTransformer" else None)
    fields["splade"] = _read_splade(root / document[1], static)
    fields["config_files"] += [root / document[1] / "config.json"]


def _read_pooling(folder: Path, fields: dict[str, Any]) -> None:
    path = folder / "config.json"
    conf = read_json(path)
    fields["config_files"] += [path]
    modes = conf.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING if conf.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in ST_POOLING]
    if unknown:
        raise ModelError(f"pooling mode {unknown[0]!r} in {path} is not one the engine runs "
                         f"(it runs: {', '.join(ST_POOLING)})")
    fields["pooling"] = "+".join(ST_POOLING[m] for m in modes)
    fields["include_prompt"] = bool(conf.get("include_prompt", True))


def _read_dense(folder: Path, where: str, allow_pickle: bool) -> DenseSpec:
    conf = read_json(folder / "config.json")
    for key in ("module_input_name", "module_output_name"):
        if conf.get(key, "sentence_embedding") != "sentence_embedding":
            raise ModelError(f"the Dense module at {where} reads or writes "
                             f"{conf[key]!r}, not the sentence embedding; not supported")
    activation = str(conf.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if not activation.startswith("torch."):
        raise ModelError(f"the Dense module at {where} names activation {activation!r}, "
                         "which is not a torch class; sentence-transformers would swap in "
                         "Tanh for it: not run")
    return DenseSpec(folder=folder, in_features=int(conf["in_features"]),
                     out_features=int(conf["out_features"]), bias=bool(conf.get("bias", True)),
                     activation=activation, residual=bool(conf.get("use_residual", False)),
                     weights=_dense_weights(folder, where, allow_pickle))


def _dense_weights(folder: Path, where: str, allow_pickle: bool) -> Path:
    safe = folder / "model.safetensors"
    if safe.is_file():
        return safe
    pickled = folder / "pytorch_model.bin"
    if not pickled.is_file():
        raise ModelError(f"the Dense module at {where} has no weights (model.safetensors or "
                         "pytorch_model.bin)")
    if not allow_pickle:
        raise ModelError(f"the Dense module at {where} has only pickle weights "
                         f"({pickled.name}); pickle can run arbitrary code: convert to "
                         "safetensors or set model.allow_pickle: true")
    return pickled


def _read_st_config(root: Path, fields: dict[str, Any]) -> None:
    path = root / "config_sentence_transformers.json"
    if not path.is_file():
        return
    conf = read_json(path)
    fields["config_files"] += [path]
    prompts = conf.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelError(f"{path}: prompts must map names to strings")
    fields["prompts"] = dict(prompts)
    default = conf.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModelError(f"{path}: default_prompt_name {default!r} is not one of its prompts "
                         f"({', '.join(prompts) or 'none'})")
    fields["default_prompt_name"] = default
    fields["similarity_fn_name"] = conf.get("similarity_fn_name")
    if isinstance(conf.get("max_active_dims"), int):
        fields["max_active_dims"] = conf["max_active_dims"]


def tokenizer_max_length(transformer_dir: Path) -> int | None:
    """``model_max_length`` of tokenizer_config.json, when set to a real length."""
    path = transformer_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = read_json(path).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < 1_000_000 else None


def position_offset(config: dict[str, Any]) -> int:
    """Where position ids start: padding index + 1 for RoBERTa-style families, else 0."""
    if config.get("model_type") in PADDING_OFFSET_TYPES:
        return int(config.get("pad_token_id", 1) or 0) + 1
    return 0
