#!/usr/bin/env python3
"""The HTTP shim under wrk: this tree's shim (1 and N workers) against an older shim and a direct master, in one run.

One command (docs/BENCHMARKS.md, "HTTP shim (wrk)")::

    PYTHONPATH=$PWD .venv/bin/python bin/bench_shim.py --old-commit 98d307b --rounds 3

1. ``dcache cluster`` (this tree): 1 master, 3 aux nodes, 2 replicas, no shim;
   100,000 keys written (every GET hits).
2. Each round, for each shim in turn (alternating, so drift hits all alike):
   start it in front of the master, ``wrk -t2 -c50`` with ``bench/wrk_get.lua``
   then ``bench/wrk_post.lua`` (``--duration`` s each, after a 2 s warm-up),
   stop it. The old shim runs from ``git archive OLD_COMMIT`` unpacked in a
   temporary folder, with ``PYTHONPATH`` pointing there and that folder as
   its working directory (each shim is checked to import its own code).
3. Each round, ``dcache bench`` straight to the master at depth 1, 50
   connections: ``--ratio 1.0`` (GET) and ``--ratio 0.0`` (SET).

Prints one Markdown table of medians (req/s, p99, the shim's CPU per request:
user + system time of the shim and its workers over the run, over the
requests answered) and ``uptime`` before and after. Needs ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MASTER_PORT = 7400
AUX_PORT = 7450
SHIM_PORT = 8091
TICKS = os.sysconf("SC_CLK_TCK")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ready(proc: subprocess.Popen[bytes], what: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"{what} exited before READY")
        if line.startswith("READY "):
            return line.split()[1]
    raise RuntimeError(f"{what}: no READY within {timeout_s} s")


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and its live children (the workers), in clock ticks."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total


def _wrk(script: str, duration: int) -> tuple[float, float, int]:
    """req/s, p99 (ms) and requests of one wrk run against the shim."""
    out = subprocess.run(
        ["wrk", "-t2", "-c50", f"-d{duration}s", "--latency", "-s", str(ROOT / "bench" / script), f"http://127.0.0.1:{SHIM_PORT}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad and script == "wrk_post.lua":
        print(f"  warning: {bad.group(1)} non-2xx answers", file=sys.stderr)
    assert p99 is not None
    return rate, float(p99.group(1)) * _UNITS[p99.group(2)], requests


def _shim_run(cmd: list[str], env: dict[str, str], duration: int) -> dict[str, tuple[float, float, float]]:
    # The code's own folder as the working directory: ``python -m`` puts the working directory first on
    # sys.path, ahead of PYTHONPATH, so started from this tree an older shim would import this tree's code.
    code = env["PYTHONPATH"]
    imported = subprocess.run(
        [cmd[0], "-c", "import dcache, os; print(os.path.dirname(os.path.dirname(dcache.__file__)))"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=code,
    ).stdout.strip()
    if os.path.realpath(imported) != os.path.realpath(code):
        raise SystemExit(f"the shim would import dcache from {imported}, not {code}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=code)
    try:
        _ready(proc, "shim")
        subprocess.run(
            ["wrk", "-t2", "-c50", "-d2s", "-s", str(ROOT / "bench" / "wrk_get.lua"), f"http://127.0.0.1:{SHIM_PORT}"],
            capture_output=True,
            check=True,
        )
        results = {}
        for name, script in (("GET", "wrk_get.lua"), ("POST", "wrk_post.lua")):
            before = _cpu_ticks(proc.pid)
            rate, p99, requests = _wrk(script, duration)
            cpu_us = (_cpu_ticks(proc.pid) - before) / TICKS / requests * 1e6
            results[name] = (rate, p99, cpu_us)
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _direct(python: str, env: dict[str, str], ratio: float, duration: int) -> tuple[float, float]:
    out = subprocess.run(
        [python, "-m", "dcache", "bench", "--addr", f"127.0.0.1:{MASTER_PORT}", "--conns", "50", "--depth", "1", "--procs", "1"]
        + ["--ratio", str(ratio), "--value-size", "100", "--duration", str(duration), "--json", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    result = json.loads(out)
    return float(result["ops_per_s"]), float(result["p99_ms"])


async def _populate(master: str) -> None:
    sys.path.insert(0, str(ROOT))
    import dcache

    async with dcache.Client(master) as c:
        for s in range(0, 100_000, 500):
            await c.mset({f"k{i}": b"x" * 100 for i in range(s, s + 500)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-commit", default="98d307b", help="commit of the older shim (default: 98d307b)")
    parser.add_argument("--workers", default="1,2", help="--workers values of this tree's shim to run (default: 1,2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk or dcache bench run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="bench-shim-") as tmp:
        old = Path(tmp) / "old"
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_commit], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(old, filter="data")
        old_env = {**os.environ, "PYTHONPATH": str(old)}
        cluster = subprocess.Popen(
            [python, "-m", "dcache", "cluster", "--masters", "1", "--aux", "3", "--replicas", "2", "--http-port", "-1"]
            + ["--port", str(MASTER_PORT), "--aux-port", str(AUX_PORT), "--data-dir", str(Path(tmp) / "data")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            master = _ready(cluster, "cluster")
            asyncio.run(_populate(master))
            shim_args = ["http", "--port", str(SHIM_PORT), "--master", master]
            shims = {f"old shim ({args.old_commit})": ([python, "-m", "dcache", *shim_args], old_env)}
            for n in args.workers.split(","):
                shims[f"new shim, --workers {n}"] = ([python, "-m", "dcache", *shim_args, "--workers", n], env)
            runs: dict[str, list[dict[str, tuple[float, float, float]]]] = {name: [] for name in shims}
            direct: dict[str, list[tuple[float, float]]] = {"GET": [], "POST": []}
            for r in range(args.rounds):
                for name, (cmd, cmd_env) in shims.items():
                    runs[name].append(_shim_run(cmd, cmd_env, args.duration))
                    print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr)
                direct["GET"].append(_direct(python, env, 1.0, args.duration))
                direct["POST"].append(_direct(python, env, 0.0, args.duration))
                print(f"round {r + 1} direct master: {direct['GET'][-1]} {direct['POST'][-1]}", file=sys.stderr)
        finally:
            cluster.terminate()
            cluster.wait(timeout=60)
    print("uptime after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    med = statistics.median
    print(f"\nmedians of {args.rounds} rounds, {args.duration} s each; CPU/req: the shim's processes")
    print("| | GET req/s | GET p99 | GET CPU/req | POST req/s | POST p99 | POST CPU/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rounds in runs.items():
        cells = []
        for op in ("GET", "POST"):
            cells += [
                f"{med(x[op][0] for x in rounds):,.0f}",
                f"{med(x[op][1] for x in rounds):.1f} ms",
                f"{med(x[op][2] for x in rounds):.0f} µs",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    g, p = direct["GET"], direct["POST"]
    print(
        f"| master direct, `dcache bench` depth 1 (GET / SET) | {med(x[0] for x in g):,.0f} | {med(x[1] for x in g):.1f} ms | - "
        f"| {med(x[0] for x in p):,.0f} | {med(x[1] for x in p):.1f} ms | - |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
