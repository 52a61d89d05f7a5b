"""pyspark's classic entry points made to raise, in every Python process that starts
with this folder on PYTHONPATH, EMBED_TEST_REFUSE_CLASSIC=1 and SPARK_REMOTE set: a
Spark Connect client. Starting a JVM gateway, a SparkContext or an accumulator, or
asking a classic session for its SparkContext, fails there instead of quietly starting
a JVM of its own (tests/test_connect.py). The Connect server's own Python workers run
without SPARK_REMOTE and are left alone.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("a classic-only pyspark API was called on the Spark Connect path")


def _guard() -> None:
    import pyspark.accumulators
    import pyspark.context
    import pyspark.java_gateway
    import pyspark.sql.session

    pyspark.java_gateway.launch_gateway = _refuse
    pyspark.context.launch_gateway = _refuse  # type: ignore[attr-defined]
    pyspark.context.SparkContext.__init__ = _refuse  # type: ignore[method-assign]
    pyspark.context.SparkContext._ensure_initialized = classmethod(_refuse)  # type: ignore
    pyspark.accumulators.Accumulator.__init__ = _refuse  # type: ignore[method-assign]
    pyspark.sql.session.SparkSession.sparkContext = property(_refuse)  # type: ignore


if os.environ.get("EMBED_TEST_REFUSE_CLASSIC") == "1" and os.environ.get("SPARK_REMOTE"):
    _guard()
