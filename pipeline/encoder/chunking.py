"""Documents -> passages (chunks), on token ids with character offsets. No torch.

A document is tokenized once (no special tokens, no truncation) with offsets
and word ids. Chunks are token ranges ``[start, end)``: at most ``max_tokens``
tokens, cut where a word starts (never between a word's word pieces, so a
chunk's text, ``text[char_start:char_end]``, re-tokenizes to the same tokens),
the next one starting at the last word start at least ``overlap_tokens``
before the previous end. ``boundary: sentences`` ends a chunk at the last
sentence start inside the window when there is one. A single word longer than
``max_tokens`` is the one place a cut falls inside a word.

For late chunking, :func:`macro_windows` groups a long document's chunks into
windows of at most ``window`` tokens, each chunk wholly inside one window, with
up to ``context`` tokens of its document before it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ChunkingConfig

# A token whose text ends with one of these, followed by whitespace (or itself a
# full-width stop), ends a sentence; a blank line ends one too.
SENTENCE_ENDS = frozenset(".!?…。！？")
FULL_WIDTH_ENDS = frozenset("。！？")


@dataclass(frozen=True)
class DocTokens:
    """One document's tokens: ids, (char start, char end) per token, word starts."""

    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n, 2], character offsets into the text
    word_starts: np.ndarray  # bool [n]: token i begins a word

    @classmethod
    def from_encoding(cls, encoding: Any) -> DocTokens:
        """From a ``tokenizers.Encoding`` made with ``add_special_tokens=False``."""
        ids = np.asarray(encoding.ids, dtype=np.int64)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        words = [-1 if w is None else w for w in encoding.word_ids]
        starts = np.ones(len(ids), dtype=bool)
        if len(ids) > 1:
            starts[1:] = np.asarray(words[1:]) != np.asarray(words[:-1])
        return cls(ids=ids, offsets=offsets, word_starts=starts)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Chunk:
    start: int  # token range [start, end) of the document's tokens
    end: int
    char_start: int  # text[char_start:char_end] is the chunk's text
    char_end: int

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


def sentence_starts(text: str, doc: DocTokens) -> np.ndarray:
    """bool [n]: token i begins a word and a sentence: a blank line comes before it,
    or the token before it ends with a stop followed by whitespace (a full-width
    stop needs none)."""
    out = np.zeros(len(doc), dtype=bool)
    for i in np.nonzero(doc.word_starts)[0][1:] if len(doc) else ():
        prev_start, prev_end = (int(x) for x in doc.offsets[i - 1])
        prev, gap = text[prev_start:prev_end], text[prev_end:int(doc.offsets[i][0])]
        stop = bool(prev) and prev[-1] in SENTENCE_ENDS
        spaced = gap != "" and gap.strip() == ""
        out[i] = "\n\n" in gap or (stop and (spaced or prev[-1] in FULL_WIDTH_ENDS))
    return out


def plan_chunks(text: str, doc: DocTokens, cfg: ChunkingConfig) -> list[Chunk]:
    """The document's chunks, in order; at least one (a text of no tokens is one
    empty chunk over the whole text)."""
    n = len(doc)
    if n == 0:
        return [Chunk(0, 0, 0, len(text))]
    words = np.nonzero(doc.word_starts)[0].tolist()
    sentences = (np.nonzero(sentence_starts(text, doc))[0].tolist()
                 if cfg.boundary == "sentences" else [])
    chunks: list[Chunk] = []
    start = 0
    while True:
        end = _chunk_end(start, n, cfg.max_tokens, words, sentences)
        chunks.append(Chunk(start, end, int(doc.offsets[start][0]),
                            int(doc.offsets[end - 1][1])))
        if end >= n:
            return chunks
        start = _next_start(start, end, cfg.overlap_tokens, words)


def _last_at_most(sorted_positions: list[int], low: int, high: int) -> int | None:
    """The largest position p with low < p <= high, or None."""
    i = bisect.bisect_right(sorted_positions, high) - 1
    return sorted_positions[i] if i >= 0 and sorted_positions[i] > low else None


def _chunk_end(start: int, n: int, max_tokens: int, words: list[int],
               sentences: list[int]) -> int:
    limit = start + max_tokens
    if limit >= n:
        return n
    sentence = _last_at_most(sentences, start, limit)
    if sentence is not None:
        return sentence
    word = _last_at_most(words, start, limit)
    return word if word is not None else limit  # one word longer than max_tokens


def _next_start(start: int, end: int, overlap: int, words: list[int]) -> int:
    """The last word start at least ``overlap`` tokens before ``end`` (and after the
    chunk's own start, so every chunk moves on); ``end`` when there is none."""
    if overlap == 0:
        return end
    found = _last_at_most(words, start, end - overlap)
    return found if found is not None else end


def macro_windows(chunks: list[Chunk], n: int, window: int,
                  context: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Token windows [a, b) of at most ``window`` tokens covering the chunks, and the
    window of each chunk (wholly inside it, with up to ``context`` tokens before it).
    ``window`` must be >= max chunk length + ``context``."""
    if n <= window:
        return [(0, n)], [0] * len(chunks)
    windows: list[tuple[int, int]] = []
    owner = [0] * len(chunks)
    i = 0
    while i < len(chunks):
        a = max(0, chunks[i].start - context)
        b = min(n, a + window)
        if b == n:
            a = max(0, n - window)
        j = i
        while j < len(chunks) and chunks[j].end <= b:
            owner[j] = len(windows)
            j += 1
        if j == i:
            raise ValueError(f"chunk [{chunks[i].start}, {chunks[i].end}) does not fit a "
                             f"window of {window} tokens with {context} of context")
        windows.append((a, b))
        i = j
    return windows, owner


def late_context(window: int, max_tokens: int) -> int:
    """Tokens of left context a macro-window gives its first chunk: a quarter of the
    window, as far as the longest chunk leaves room."""
    return max(0, min(window // 4, window - max_tokens))


def check_fits(cfg: ChunkingConfig, max_length: int, around: int,
               max_positions: int | None) -> None:
    """A chunk (split) or a macro-window (late) plus ``around`` tokens (special tokens,
    prompt) must fit model.max_length, and model.max_length the model's window."""
    from pipeline.errors import ConfigError

    if max_positions is not None and max_length > max_positions:
        raise ConfigError("model.max_length", f"{max_length} is beyond the model's window of "
                          f"{max_positions} positions (max_position_embeddings)")
    room = max_length - around
    if cfg.max_tokens > room:
        raise ConfigError("chunking.max_tokens", f"{cfg.max_tokens} tokens + {around} special "
                          f"and prompt tokens exceed model.max_length {max_length}: at most "
                          f"{room}")


def tokens_around(model_dir: str | Path, prompt: str) -> int | None:
    """Special + prompt tokens a unit carries, from the model's tokenizer.json (cheap:
    no transformers import); None when there is no tokenizer.json."""
    from pathlib import Path

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    if tok.post_processor is not None:
        special = len(tok.encode("a").ids) - len(tok.encode("a", add_special_tokens=False).ids)
    else:  # transformers adds them from tokenizer_config.json ([CLS] .. [SEP], BOS, EOS)
        special = _configured_specials(Path(model_dir) / "tokenizer_config.json")
    return special + (len(tok.encode(prompt, add_special_tokens=False).ids) if prompt else 0)


def _configured_specials(path: Path) -> int:
    import json

    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError):
        return 2
    if conf.get("cls_token") and conf.get("sep_token"):
        return 2
    return int(bool(conf.get("add_bos_token"))) + int(bool(conf.get("add_eos_token")))
