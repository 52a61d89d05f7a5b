"""spark-submit entry point: ``spark-submit jobs/embed.py --config conf/demo.yaml [--set k=v]``.

Thin on purpose: the same click command as ``embed run``, so both entry points
parse, validate and behave the same way. The SparkSession spark-submit set up
(master, packages, resources) is the one the run uses.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["run", "--no-progress", *sys.argv[1:]], prog_name="jobs/embed.py")
