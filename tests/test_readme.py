"""Every command the README and docs/*.md show, run exactly as typed, in a fresh shell.

The commands are parsed from README.md's ```bash blocks and run in a copy of the
checkout (so the demo warehouse they write is the test's own), with this
checkout's .venv linked in, by a login shell started with an empty environment:
no activated venv, no .venv/bin on PATH, no SPARK_HOME or PYSPARK_* variables.
A block runs as one script (its ``export`` lines hold for the lines after them)
and must exit 0; ```python blocks then run with the checkout's interpreter.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Commands that are not run here, and why.
NOT_RUN = {
    "make test": "the command that runs this very test (.ci/run runs it)",
}
# Blocks that start Airflow or a standalone cluster: tests/test_deploy.py runs these
# very commands (with its own AIRFLOW_HOME, state dir and ports), so the suite starts
# each once; test_deploy_runs_the_docs_airflow_and_cluster_commands checks that. The
# Spark Connect block: tests/test_connect.py runs it as typed.
DEPLOY_BLOCKS = ("export AIRFLOW_HOME=", ".venv/bin/embed cluster start",
                 ".venv/bin/embed connect-server start")
# Blocks that read none of the demo tables and change no Spark setup (the S3 demo
# runs against its own S3 server): they run beside `make demo`, not after it.
BESIDE_THE_DEMO = (".venv/bin/moto_server",)
DOCS = ("README.md", "docs/outputs.md", "docs/tables.md", "docs/search.md", "docs/sparse.md",
        "docs/passages.md", "docs/lineage-drift.md", "docs/operations.md",
        "docs/performance.md", "docs/storage.md", "docs/deployment.md")


def all_text(root) -> str:
    """The README, then each docs file, in the order a reader follows them."""
    return "\n".join((root / name).read_text() for name in DOCS)


def runnable(blocks: list[list[str]]) -> list[list[str]]:
    return [b for b in blocks if not b[0].startswith(DEPLOY_BLOCKS)]


# What Ivy prints when spark-submit resolves --packages / spark.jars.packages itself
IVY_LINE = re.compile(r"^(?:::.*|\s*confs: .*|\s*found \S+#.*|Ivy Default Cache.*|"
                      r"The jars for the packages.*|.*spark-packages.*|.*UNRESOLVED.*)$", re.M)
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
PYTHON_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_blocks(text: str) -> list[list[str]]:
    """The README's bash blocks, each a list of commands (continuations joined,
    comment-only lines dropped)."""
    blocks = []
    for body in FENCE.findall(text):
        commands, current = [], ""
        for line in body.splitlines():
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            if current.strip() and not current.lstrip().startswith("#"):
                commands.append(current.strip())
            current = ""
        blocks.append(commands)
    return blocks


def command_name(command: str) -> str:
    """A command without its trailing comment: what NOT_RUN keys name."""
    return re.sub(r"\s+#.*$", "", command).strip()


def fresh_shell_env() -> dict[str, str]:
    """What a new terminal on this machine starts from: nothing but who and where."""
    env = {"HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", "TERM": "dumb",
           "USER": os.environ.get("USER", "root")}
    return env


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory) -> Path:
    """The tracked files of this checkout in a new folder, with its .venv linked in
    (a venv is not relocatable; what the README's commands write stays in the copy)."""
    copy = tmp_path_factory.mktemp("readme") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    return copy


def test_readme_blocks_parse():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    # the README starts with exactly two commands: set up + demo, and the tests
    assert [command_name(c) for c in blocks[0]] == ["make demo", "make test"]
    assert all(blocks), "an empty bash block"
    # every docs file is read here, and the docs folder has no other
    assert sorted(DOCS[1:]) == sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))


def test_deploy_runs_the_docs_airflow_and_cluster_commands():
    """The blocks this test leaves to tests/test_deploy.py: each of their commands is one
    test_deploy runs (the same program and subcommand; its own paths and ports)."""
    deploy = (ROOT / "tests" / "test_deploy.py").read_text()
    calls = {tuple(re.findall(r'"([^"]+)"', args))
             for args in re.findall(r'airflow\(([^)]*)\)', deploy)}
    blocks = [b for b in readme_blocks(all_text(ROOT)) if b[0].startswith(DEPLOY_BLOCKS[:2])]
    assert len(blocks) == 2, blocks
    airflow = [c.split() for c in " && ".join(blocks[0][1:]).split(" && ")]
    assert airflow and all(c[0] == "airflow" for c in airflow)
    for command in airflow:  # its words but the date: a call test_deploy makes
        key = tuple(w for w in command[1:] if not re.fullmatch(r"\d{4}-\d\d-\d\d", w))
        assert len(key) >= 2 and any(call[:len(key)] == key for call in calls), command
    cluster = [command_name(c).split() for c in blocks[1]]
    assert [c[:3] for c in cluster] == [[".venv/bin/embed", "cluster", "start"],
                                        [".venv/bin/spark-submit", "--master",
                                         "spark://127.0.0.1:7077"],
                                        [".venv/bin/embed", "cluster", "stop"]]
    for needle in ('"cluster", "start"', '"cluster", "stop"', '"spark-submit"',
                   '"jobs/embed.py", "--config"'):
        assert needle in deploy, needle


def block_script(commands: list[str]) -> str:
    """One block as one script; each command is echoed ('+ ...') and timed ('= N s')."""
    return "set -euo pipefail\n" + "\n".join(
        f"echo '+ {c.replace(chr(39), '')}'\nstarted=$SECONDS\n{c}\n"
        f"echo \"= $((SECONDS - started)) s\"" for c in commands
        if command_name(c) not in NOT_RUN) + "\n"


def _kill_groups(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def spark_conf_kept():
    """The README's `embed setup-spark --storage s3` rewrites this environment's
    spark-defaults.conf (the copy's .venv is this checkout's): put it back afterwards, so
    the rest of the suite runs with the Spark setup scripts/test.sh made."""
    from pipeline.spark import spark_home

    files = [spark_home() / "conf" / name for name in ("spark-defaults.conf",
                                                       "embed-storage.txt")]
    saved = {f: f.read_bytes() for f in files if f.is_file()}
    try:
        yield
    finally:
        for f in files:
            if f in saved:
                f.write_bytes(saved[f])
            else:
                f.unlink(missing_ok=True)


@dataclass(frozen=True)
class Block:
    commands: list[str]
    returncode: int
    stdout: str
    stderr: str

    def failure(self) -> str | None:
        if self.returncode == 0:
            return None
        ran = [line for line in self.stdout.splitlines() if line.startswith("+ ")]
        return (f"block starting {self.commands[0]!r} failed (exit {self.returncode}) at "
                f"{ran[-1] if ran else '?'}:\n{self.stdout[-1500:]}\n{self.stderr[-2500:]}")


def run_blocks(copy: Path, blocks: list[list[str]], timeout: int = 1500) -> list[Block]:
    """The blocks at once, each in its own fresh login shell (what two terminals would
    do); their results in the blocks' order. Output goes to files: a block that fills a
    pipe nobody reads yet would stall."""
    with contextlib.ExitStack() as stack:
        files = [(stack.enter_context(tempfile.TemporaryFile("w+")),
                  stack.enter_context(tempfile.TemporaryFile("w+"))) for _ in blocks]
        # each block in a process group of its own: what it left running in the background
        # (a block that failed before stopping its server) is stopped with it
        procs = [subprocess.Popen(["bash", "-l", "-c", block_script(commands)], cwd=copy,
                                  env=fresh_shell_env(), stdout=out, stderr=err, text=True,
                                  start_new_session=True)
                 for commands, (out, err) in zip(blocks, files, strict=True)]
        stack.callback(_kill_groups, procs)
        done = []
        for commands, proc, (out, err) in zip(blocks, procs, files, strict=True):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # none outlives the test, as with run()
                _kill_groups(procs)
                raise
            out.seek(0)
            err.seek(0)
            done.append(Block(commands, proc.returncode, out.read(), err.read()))
        return done


@pytest.mark.slow
def test_every_readme_command_runs_as_typed_in_a_fresh_shell(checkout_copy):
    probe = subprocess.run(["bash", "-l", "-c", "echo $PATH; env"], cwd=checkout_copy,
                           env=fresh_shell_env(), capture_output=True, text=True, check=True)
    assert ".venv" not in probe.stdout.splitlines()[0]
    assert not re.search(r"^(SPARK_HOME|PYSPARK_\w+|VIRTUAL_ENV)=", probe.stdout, re.M)

    blocks = runnable(readme_blocks(all_text(checkout_copy)))
    failures = []
    with spark_conf_kept():
        _run_all(checkout_copy, blocks, failures)
    assert not failures, "\n\n".join(failures)


def _run_all(checkout_copy: Path, blocks: list[list[str]], failures: list[str]) -> None:
    try:
        # The first block (make demo) sets up and writes the demo tables that later
        # blocks read; the S3 block reads none of them and runs beside it; the later
        # blocks do not depend on each other, and run at once.
        apart = [b for b in blocks[1:] if b[0].startswith(BESIDE_THE_DEMO)]
        first = run_blocks(checkout_copy, blocks[:1] + apart)
        later = [b for b in blocks[1:] if b not in apart]
        rest = run_blocks(checkout_copy, later) if first[0].returncode == 0 else []
        for block in first + rest:
            ivy = IVY_LINE.findall(block.stdout + block.stderr)
            if block.commands[0].startswith("make demo") and ivy:  # the first screen
                failures.append(f"make demo printed Ivy's resolution log: {ivy[:5]}")
            print("\n".join(line for line in block.stdout.splitlines()
                            if line.startswith(("+ ", "= "))))
            if failed := block.failure():
                failures.append(failed)
        # python snippets run after the shell blocks (which made the demo tables)
        for snippet in PYTHON_FENCE.findall(all_text(checkout_copy)):
            proc = subprocess.run([str(checkout_copy / ".venv" / "bin" / "python"), "-c",
                                   snippet], cwd=checkout_copy, env=fresh_shell_env(),
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                failures.append(f"python snippet failed:\n{snippet}\n{proc.stderr[-2500:]}")
    finally:
        # a block that starts a cluster must not leave it running when it fails
        subprocess.run([str(checkout_copy / ".venv" / "bin" / "embed"), "cluster", "stop"],
                       cwd=checkout_copy, env=fresh_shell_env(), capture_output=True,
                       timeout=120)
