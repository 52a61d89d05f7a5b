"""Everything a run can check before Spark starts: config against model, output dims,
chunk sizes, source path; and the model's own values for what the config left open.

The model directory is the source of truth (pipeline.encoder.stack): ``pooling:
auto``, ``max_length: null`` and ``prompt: null`` become what sentence-transformers
would use, so the rest of the run (the workers, the table's identity, the runs
table) sees concrete values. A value the config sets that disagrees with the
model's is kept and warned about (the run summary prints it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline import source, storage
from pipeline.config import RunConfig, check_length_rules, check_pooling_rules
from pipeline.encoder import chunking as chunker
from pipeline.encoder.engine import validate_outputs
from pipeline.encoder.model import ModelInfo, fingerprint, inspect_model, resolve
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Preflight:
    cfg: RunConfig  # with the model's own pooling, max length and prompt filled in
    info: ModelInfo
    warnings: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """sha256 of what shapes the vectors (hashed once per process and file set)."""
        return fingerprint(self.info)

    def stack_lines(self) -> list[str]:
        """What ``embed validate`` prints: the resolved stack, one fact a line."""
        m, stack, info = self.cfg.model, self.info.modules, self.info
        lines = [f"modules: {stack.modules_line(m.pooling, info.hidden_size)}",
                 f"model: {info.model_type}, {info.num_layers} layers, hidden "
                 f"{info.hidden_size}, output {info.output_dim(m.pooling)}",
                 f"max length: {m.max_length} tokens"
                 + (f" (window {info.window})" if info.window else ""),
                 f"document prompt: {m.prompt!r}; query prompt: {stack.query_prompt()!r}"]
        if stack.similarity_fn_name:
            lines.append(f"similarity: {stack.similarity_fn_name}")
        return lines + [f"warning: {w}" for w in self.warnings]


def preflight(cfg: RunConfig) -> Preflight:
    """Read the model, fill in its own values, check what can be checked without Spark.
    The config's ``storage:`` section is what this process's clients use from here on."""
    storage.activate(cfg.storage)
    info = inspect_model(cfg.model.name_or_path, cfg.model.allow_pickle)
    resolved = resolve(cfg.model, info)
    cfg = dataclasses.replace(cfg, model=resolved.cfg)
    check_length_rules(cfg)
    check_pooling_rules(cfg)
    if cfg.model.long_text == "chunk" and not info.modules.include_prompt and cfg.model.prompt:
        raise ConfigError("model.long_text", "chunk windows and a model whose pooling leaves "
                          "its prompt out (include_prompt: false) do not go together: the "
                          "prompt is in the first window only")
    validate_outputs(cfg.outputs, info, cfg.model.pooling)
    if cfg.chunking.enabled:
        around = chunker.tokens_around(info.modules.transformer_dir, cfg.model.prompt or "")
        chunker.check_fits(cfg.chunking, cfg.model.max_length or 0, around or 0, info.window)
    source.check_source_path(cfg.source)
    checked = Preflight(cfg=cfg, info=info, warnings=resolved.warnings)
    if cfg.model.backend != "torch":  # exported (or found in the cache) before Spark starts
        from pipeline.encoder import onnx

        onnx.prepare(cfg.model, info, cfg.outputs, checked.fingerprint)
    return checked
