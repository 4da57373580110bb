"""``bench/locustfile.py`` against a small real cluster, so the load test cannot rot.

Locust (gevent) runs as a subprocess: its monkey-patching and warnings stay
out of pytest's process (``filterwarnings = error``).
"""

from __future__ import annotations

import asyncio
import csv
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, start_http

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "bench" / "locustfile.py"
NAMES = {"POST /data", "GET /data/{key} (hit)", "GET /data/{key} (miss)", "DELETE /data/{key}"}


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    cluster = Cluster(tmp_path_factory.mktemp("locust"))
    http = None
    try:
        cluster.start_master("m1")
        cluster.start_aux("a1")
        cluster.start_aux("a2")
        asyncio.run(wait_ring(cluster.coordinator.addr, settled({"a1", "a2"}), what="a1, a2 up"))
        http = start_http(cluster.coordinator.addr)
        yield http
    except BaseException:
        print(cluster.logs() + ("\n--- http\n" + http.stderr() if http else ""))
        raise
    finally:
        if http is not None:
            http.kill()
        cluster.stop()


def test_locustfile_runs_clean(shim: DaemonProcess, tmp_path: Path) -> None:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    assert locust is not None, "locust is not installed: `make test` installs it (pip install -e '.[test]')"
    cmd = [
        locust,
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        "10",
        "-r",
        "10",
        "-t",
        "5s",
        "--host",
        f"http://{shim.addr}",
        "--only-summary",
        "--csv",
        str(tmp_path / "x"),
    ]
    r = subprocess.run(cmd, capture_output=True, timeout=90, cwd=tmp_path)
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert r.returncode == 0, out[-6000:] + "\n--- shim\n" + shim.stderr()
    with (tmp_path / "x_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert NAMES <= rows.keys(), (sorted(rows), out[-4000:])
    for name in NAMES:
        assert int(rows[name]["Request Count"]) > 0, (name, rows[name])
        assert int(rows[name]["Failure Count"]) == 0, (name, rows[name], out[-4000:])
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    failures = (tmp_path / "x_failures.csv").read_text()
    assert failures.count("\n") <= 1, failures  # the header only
