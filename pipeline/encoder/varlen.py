"""Unpadded ("packed") forward passes: no FLOP of the linear layers goes to padding.

A batch of rows is concatenated into one sequence of N real tokens, with
per-row position ids and ``cu_seqlens`` (row boundaries, as flash-attn's varlen
kernels take them). Every matmul outside attention then runs on exactly the
real tokens. Attention must not mix rows; two backends do that:

- ``flash``: flash-attn's ``flash_attn_varlen_func`` through transformers'
  ``flash_attention_2`` (the ``gpu`` extra, CUDA, fp16/bf16).
- ``varlen`` (this module's ``embed_varlen`` attention, registered with
  transformers): torch's own varlen flash kernel
  (``torch.nn.attention.varlen.varlen_attn``) on CUDA in fp16/bf16; elsewhere
  (CPU, fp32) it gathers each row's queries, keys and values into a
  [rows, heads, longest, d] block and runs SDPA with a key mask, so only the
  attention scores see padding (within one length-sorted batch: little).

Called without ``cu_seq_lens_q`` (a padded batch, as in the load-time probe),
``embed_varlen`` is transformers' SDPA attention, mask included.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

NAME = "embed_varlen"


@functools.cache
def register() -> str:
    """Register ``embed_varlen`` with transformers' attention and mask interfaces."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                  **kwargs: Any) -> tuple[Any, None]:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        spec = Packing(cu=cu, max_len=int(kwargs["max_length_q"]), scale=kwargs.get("scaling"),
                       causal=bool(getattr(module, "is_causal", False)),
                       window=int(window) if window else None)
        out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                               value[0].transpose(0, 1), spec)
        return out.unsqueeze(0), None  # [1, N, heads, d], as transformers reshapes it

    def mask(*args: Any, **kwargs: Any) -> Any:
        # Packed batches carry no mask (rows are kept apart by cu_seqlens).
        if kwargs.get("attention_mask") is None:
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
    return NAME


@dataclass(frozen=True)
class Packing:
    """How the rows of a packed batch attend: ``cu`` (int32 [B+1]) delimits them, the
    longest has ``max_len`` tokens; ``scale`` (None: 1/sqrt(d)); ``causal``; ``window``
    (sliding-window layers, e.g. Gemma 3's): a query sees keys less than ``window``
    positions away (behind it only, when causal), as transformers' masks say."""

    cu: Any
    max_len: int
    scale: float | None = None
    causal: bool = False
    window: int | None = None


def varlen_attention(q: Any, k: Any, v: Any, spec: Packing) -> Any:
    """q [N, Hq, d], k/v [N, Hkv, d] packed as ``spec`` says -> [N, Hq, d]."""
    import torch

    cu, max_len, scale, causal, window = (spec.cu, spec.max_len, spec.scale, spec.causal,
                                          spec.window)
    fast = _torch_varlen()
    if (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and fast
            and (window is None or "window_size" in fast[1])):
        return _cuda_varlen(q, k, v, spec)
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < lens[:, None]  # [B, T]
    src = (cu[:-1, None].long() + pos).clamp(max=q.shape[0] - 1)
    qp, kp, vp = (x[src].transpose(1, 2) for x in (q, k, v))  # [B, heads, T, d]
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & (pos[None, :] <= pos[:, None])[None, None]
    if window is not None:
        mask = mask & ((pos[:, None] - pos[None, :]).abs() < window)[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)[valid]  # rows in order, each row's tokens in order


@functools.cache
def _torch_varlen() -> tuple[Any, frozenset[str]] | None:
    """torch's varlen_attn and the keywords this torch's version takes (2.10 on), or None."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _cuda_varlen(q: Any, k: Any, v: Any, spec: Packing) -> Any:
    """torch's varlen flash kernel; its keywords changed between torch 2.10 and 2.15."""
    cu, max_len, scale, causal, window = (spec.cu, spec.max_len, spec.scale, spec.causal,
                                          spec.window)
    gqa = q.shape[1] != k.shape[1]
    found = _torch_varlen()
    assert found is not None, "torch's varlen kernel (varlen_attention checked for it)"
    fn, params = found
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        reach = -1 if window is None else window - 1
        kwargs["window_size"] = (reach, 0) if causal else (reach, reach)
    elif causal:
        kwargs["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel scales by 1/sqrt(d): fold the difference into q
            q = q * (scale * q.shape[-1] ** 0.5)
    if gqa:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def pack_batch(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
               idx: np.ndarray, position_offset: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``idx`` of a flat token buffer -> (ids [N], position ids [N], cu_seqlens [B+1]).

    Vectorised: token j of the packed batch is flat[offsets[row] + (j - start of row)].
    Position ids count from ``position_offset`` (RoBERTa-style models: padding index + 1).
    """
    row_len = lengths[idx]
    cu = np.zeros(len(idx) + 1, dtype=np.int32)
    np.cumsum(row_len, out=cu[1:])
    starts = np.repeat(cu[:-1].astype(np.int64), row_len)
    positions = np.arange(int(cu[-1]), dtype=np.int64) - starts
    ids = flat[np.repeat(offsets[idx], row_len) + positions]
    return ids.astype(np.int64), positions + position_offset, cu
