"""Concurrent writers on one Delta table in an S3 API server (moto's, on 127.0.0.1):
lost commits and doubled ids, counted.

    .venv/bin/python bench/races.py runs --races 20        # two `embed run` drivers at once
    .venv/bin/python bench/races.py runs --races 5 --store single-driver   # Delta's own
    .venv/bin/python bench/races.py optimize --races 5     # a run racing `embed maintain`
    .venv/bin/python bench/races.py appends --commits 30   # two drivers' blind appends
    .venv/bin/python bench/races.py bookkeeping --commits 50   # delta-rs appends

``runs``: each race writes two new source tables of disjoint ids and starts two
``embed run`` processes into one output table at once; a driver that loses the race
exits 7 (nothing of it written) and is re-run. Counted: drivers that exited 0 but whose
rows are missing (lost commits), ids stored twice, and the commit PUTs the store
refused (HTTP 412 on ``_delta_log/*.json``: two drivers wrote one version at once).
``appends``: two Spark drivers append to one table as fast as they can, with this
project's log store (commits are conditional PUTs) and with Delta's own
S3SingleDriverLogStore, for comparison. ``bookkeeping``: two processes append rows with
delta-rs (its commits are conditional PUTs too). Figures: docs/storage.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3 import S3Server, environment, free_port  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python")
EMBED = str(ROOT / ".venv" / "bin" / "embed")
ROWS = 40  # new rows per driver and race


def write_source(path: str, first_id: int, rows: int = ROWS) -> None:
    """A source of ``rows`` demo docstrings with ids from ``first_id`` (delta-rs)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipeline import storage
    from pipeline.demo import demo_rows

    texts = [r["text"] for r in demo_rows(rows)]
    table = pa.table({"id": pa.array(range(first_id, first_id + rows), pa.int64()),
                      "text": texts})
    location = storage.normalize(path)
    write_deltalake(location, table, mode="overwrite",
                    configuration={"delta.enableChangeDataFeed": "true"},
                    storage_options=storage.settings().delta_options(location))


def config(folder: Path, source: str, sink: str, extra: str = "") -> Path:
    path = folder / f"{Path(source).name}.yaml"
    path.write_text(
        f"source: {{path: {source}}}\n"
        "outputs: [{name: emb, dim: 384}]\n"
        f"sink: {{path: {sink}}}\n"
        "model: {parity_check: false}\n"
        "spark: {master: 'local[1]'" + extra + "}\n"
        "drift: {canary: {enabled: false}, distribution: {enabled: false}}\n")
    return path


def stored_ids(table: str) -> list[int]:
    from pipeline import deltars

    return deltars.dataset(table).to_table(columns=["id"]).column("id").to_pylist()


def refused_commits(log: Path, since: int) -> int:
    """HTTP 412 answers to PUTs of Delta commit files, in moto's log after ``since``."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))  # moto colours
    lines = plain.splitlines()[since:]
    return sum(1 for ln in lines if '"PUT /' in ln and "_delta_log" in ln and '" 412 ' in ln)


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def race_runs(server: S3Server, work: Path, races: int, against: str = "run",
              extra: str = "") -> dict:
    """``races`` races of two `embed run` drivers (or a run and `embed maintain
    --optimize`, ``against="optimize"``) into one table."""
    env = {**os.environ, **environment(server.endpoint)}
    bucket = server.bucket(f"races-{against}-{int(time.time())}")
    sink = f"{bucket}/out"
    seed = config(work, f"{bucket}/seed", sink, extra)
    write_source(f"{bucket}/seed", 0)
    subprocess.run([EMBED, "run", "--config", str(seed), "--no-progress"], env=env, cwd=work,
                   check=True, capture_output=True)
    expected = set(range(ROWS))
    totals = {"races": races, "exits": {}, "reruns": 0, "lost": 0, "doubled": 0, "refused": 0}
    for r in range(1, races + 1):
        sources = [f"{bucket}/src{r}a", f"{bucket}/src{r}b"][: 2 if against == "run" else 1]
        for i, src in enumerate(sources):
            write_source(src, (2 * r + i) * 1000)
        configs = [config(work, s, sink, extra) for s in sources]
        cmds = [[EMBED, "run", "--config", str(c), "--no-progress"] for c in configs]
        if against == "optimize":
            cmds.append([EMBED, "maintain", "--table", sink, "--optimize"])
        mark = len(server.log.read_text(errors="replace").splitlines())
        procs = [start(c, env, work) for c in cmds]
        codes = [p.wait() for p in procs]
        outputs = [p.stdout.read() if p.stdout else "" for p in procs]
        for code, cmd, out in zip(codes, cmds, outputs, strict=True):
            totals["exits"][str(code)] = totals["exits"].get(str(code), 0) + 1
            if code not in (0, 7):
                raise SystemExit(f"race {r}: {' '.join(cmd[1:3])} exited {code}:\n{out[-3000:]}")
            if code == 7:  # lost the race, nothing written: run it again
                totals["reruns"] += 1
                subprocess.run(cmd, env=env, cwd=work, check=True, capture_output=True)
        for src in sources:
            first = int(src.rsplit("src", 1)[1][:-1]) * 2 + (src[-1] == "b")
            expected |= set(range(first * 1000, first * 1000 + ROWS))
        ids = stored_ids(sink)
        totals["lost"] += len(expected - set(ids))
        totals["doubled"] += len(ids) - len(set(ids))
        totals["refused"] += refused_commits(server.log, mark)
        print(f"race {r}: exits {codes}, table {len(ids)} rows, {len(set(ids))} ids, "
              f"missing {len(expected - set(ids))}", flush=True)
    return totals


_APPENDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from pipeline.config import SparkConfig
from pipeline.spark import get_session
store = sys.argv[3]
conf = {{}} if store == "conditional" else {{
    "spark.delta.logStore.s3a.impl": "io.delta.storage.S3SingleDriverLogStore"}}
spark = get_session(SparkConfig(master="local[1]", conf=conf), storages=("s3",))
open(sys.argv[4], "w").write("ready")
while not os.path.exists(sys.argv[5]):
    time.sleep(0.05)
ok = 0
for i in range(int(sys.argv[2])):
    try:
        spark.range(1).selectExpr(f"'{{sys.argv[6]}}-{{i}}' as id").write.format("delta") \\
            .mode("append").save(sys.argv[1])
        ok += 1
    except Exception as exc:
        why = [ln for ln in str(exc).splitlines() if "Exception" in ln][:1] or [str(exc)]
        print("append failed:", why[0][:300], flush=True)
print("appended", ok, flush=True)
"""


def race_appends(server: S3Server, work: Path, commits: int, store: str) -> dict:
    """Two drivers append ``commits`` one-row commits each to one table at once."""
    env = {**os.environ, **environment(server.endpoint)}
    bucket = server.bucket(f"appends-{store}-{int(time.time())}")
    table = f"s3a://{bucket.removeprefix('s3://')}/t"
    script = work / "appender.py"
    script.write_text(_APPENDER.format(root=str(ROOT)))
    go = work / f"go-{store}"
    procs = [start([PY, str(script), table, str(commits), store, str(work / f"ready-{store}{i}"),
                    str(go), f"d{i}"], env, work) for i in range(2)]
    while not all((work / f"ready-{store}{i}").exists() for i in range(2)):
        if any(p.poll() is not None for p in procs):
            raise SystemExit("an appender died: " + "".join(p.stdout.read() for p in procs
                                                             if p.stdout))
        time.sleep(0.2)
    mark = len(server.log.read_text(errors="replace").splitlines())
    go.write_text("go")
    outs = [p.communicate()[0] for p in procs]
    reported = sum(int(o.rsplit("appended", 1)[1].split()[0]) for o in outs if "appended" in o)
    failures = [ln for o in outs for ln in o.splitlines() if ln.startswith("append failed")]
    ids = stored_ids(table)
    from pipeline import deltars

    versions = deltars.open_table(table).version()
    return {"store": store, "commits_reported": reported, "rows": len(ids),
            "lost": reported - len(set(ids)), "doubled": len(ids) - len(set(ids)),
            "table_version": versions, "refused": refused_commits(server.log, mark),
            "failures": failures}


_BOOKKEEPER = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline import deltars
while time.time() < float(sys.argv[3]):
    time.sleep(0.01)
for i in range(int(sys.argv[2])):
    deltars.append(sys.argv[1], "id string", [{{"id": f"{{sys.argv[4]}}-{{i}}"}}], "{{}}")
print("appended", sys.argv[2])
"""


def race_bookkeeping(server: S3Server, work: Path, commits: int) -> dict:
    """Two processes append ``commits`` one-row commits each with delta-rs at once."""
    env = {**os.environ, **environment(server.endpoint)}
    bucket = server.bucket(f"bookkeeping-{int(time.time())}")
    table = f"{bucket}/runs"
    script = work / "bookkeeper.py"
    script.write_text(_BOOKKEEPER.format(root=str(ROOT)))
    at = str(time.time() + 3)
    mark = len(server.log.read_text(errors="replace").splitlines())
    procs = [start([PY, str(script), table, str(commits), at, f"p{i}"], env, work)
             for i in range(2)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a bookkeeper failed:\n" + "\n".join(o[-2000:] for o in outs))
    ids = stored_ids(table)
    return {"commits": 2 * commits, "rows": len(ids), "lost": 2 * commits - len(set(ids)),
            "doubled": len(ids) - len(set(ids)), "refused": refused_commits(server.log, mark)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["runs", "optimize", "appends", "bookkeeping"])
    parser.add_argument("--races", type=int, default=20)
    parser.add_argument("--commits", type=int, default=30)
    parser.add_argument("--store", choices=["conditional", "single-driver"],
                        default="conditional",
                        help="runs / optimize: this project's log store, or Delta's "
                             "S3SingleDriverLogStore (set in spark.conf, as a user would)")
    args = parser.parse_args()
    extra = ("" if args.store == "conditional" else ", conf: {spark.delta.logStore.s3a.impl: "
             "io.delta.storage.S3SingleDriverLogStore}")
    os.environ["PYSPARK_PYTHON"] = PY
    with tempfile.TemporaryDirectory(prefix="embed-races-") as tmp:
        work = Path(tmp)
        server = S3Server(free_port(), work).start()
        os.environ.update(environment(server.endpoint))
        try:
            started = time.perf_counter()
            if args.what in ("runs", "optimize"):
                found = race_runs(server, work, args.races, "run" if args.what == "runs"
                                  else "optimize", extra)
                out = [{"store": args.store, **found}]
            elif args.what == "appends":
                out = [race_appends(server, work, args.commits, store)
                       for store in ("conditional", "single-driver")]
            else:
                out = [race_bookkeeping(server, work, args.commits)]
        finally:
            server.stop()
            if os.environ.get("RACES_KEEP_LOG"):
                Path(os.environ["RACES_KEEP_LOG"]).write_text(server.log.read_text())
    for row in out:
        print(json.dumps({"what": args.what, **row,
                          "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
