"""The Spark-free encoder core: texts in, Arrow output columns out.

``Encoder`` and ``EncodeResult`` load on first use: the core's small modules
(stack, codec, parity ...) import without torch or the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.encoder.engine import Encoder, EncodeResult

__all__ = ["EncodeResult", "Encoder"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipeline.encoder import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
