"""A re-run that nothing changed for, on a local table and on the same table in an S3
API server (moto's, on 127.0.0.1): wall seconds of `embed run`, side by side.

    .venv/bin/python bench/noop.py --rows 300 --repeat 5

Each target gets one real run (the table made), then ``--repeat`` no-op runs, each a
fresh `embed run` process as a scheduler starts it; the median is reported, with the
CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference import cpu_label  # noqa: E402
from tests.s3 import S3Server, environment, free_port  # noqa: E402

EMBED = str(ROOT / ".venv" / "bin" / "embed")


def timed_runs(config: Path, env: dict[str, str], repeat: int) -> list[float]:
    first = subprocess.run([EMBED, "run", "--config", str(config), "--json", "--no-progress"],
                           env=env, capture_output=True, text=True)
    if first.returncode != 0:
        raise SystemExit(first.stderr[-3000:])
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        again = subprocess.run([EMBED, "run", "--config", str(config), "--json",
                                "--no-progress"], env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        result = json.loads(again.stdout.strip().splitlines()[-1])
        assert again.returncode == 0 and result["rows_read"] == 0, again.stderr[-2000:]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="embed-noop-") as tmp:
        work = Path(tmp)
        server = S3Server(free_port(), work).start()
        env = {**os.environ, **environment(server.endpoint),
               "PYSPARK_PYTHON": str(ROOT / ".venv" / "bin" / "python")}
        os.environ.update(environment(server.endpoint))
        try:
            server.bucket("noop")
            out = {}
            for name, base in (("local", str(work / "lake")), ("s3", "s3://noop/lake")):
                subprocess.run([EMBED, "demo-data", "--out", f"{base}/src", "--limit",
                                str(args.rows)], env=env, check=True, capture_output=True)
                config = work / f"{name}.yaml"
                config.write_text(f"source: {{path: '{base}/src'}}\n"
                                  "outputs: [{name: emb, dim: 384}]\n"
                                  f"sink: {{path: '{base}/out'}}\n")
                out[name] = statistics.median(timed_runs(config, env, args.repeat))
        finally:
            server.stop()
    print(json.dumps({"cpu": cpu_label(), "rows": args.rows, "repeat": args.repeat,
                      "noop_local_s": round(out["local"], 2), "noop_s3_s": round(out["s3"], 2),
                      "ratio": round(out["s3"] / out["local"], 2)}))


if __name__ == "__main__":
    main()
