"""The Spark-free encoder core: texts in, Arrow output columns out."""

from pipeline.encoder.engine import Encoder, EncodeResult

__all__ = ["EncodeResult", "Encoder"]
