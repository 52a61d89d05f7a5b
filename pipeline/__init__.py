"""Batch embedding pipeline: text tables -> Spark -> Spark-free encoder core -> Delta.

The encoder core (``pipeline.encoder``) imports neither Spark nor
Delta; ``pipeline.run`` is the one module that wires the stages together.
"""

__version__ = "0.1.0"
