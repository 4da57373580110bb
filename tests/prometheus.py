"""Real Prometheus for tests: find (or install) it, render docker/prometheus.yml for a test cluster, run it, query it.

``find_prometheus()`` returns the ``prometheus`` and ``promtool`` binaries,
installing Debian's ``prometheus`` package (it ships both) with apt-get when
they are missing and we are root. When they still cannot be had the test
fails under CI (``CI`` set) and is skipped elsewhere.

``render_config()`` loads the repo's ``docker/prometheus.yml`` and keeps its
jobs, but points each job at the test's loopback targets and scrapes every
second, so a test sees data within seconds. ``PrometheusProcess`` runs the
server on a free loopback port with its TSDB in the test's temp directory and
answers instant queries and the targets list through the HTTP API. Every wait
is bounded.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped, unused-ignore]  # no types-PyYAML in the venv

from tests.harness import DaemonProcess, apt_install, stop_process, unavailable, wait_for

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "docker" / "prometheus.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "dcache.json"

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0
#: Prometheus sends static targets to the scrape manager on a 5 s tick, so the
#: first scrape comes 5-6 s after start: targets need longer than that.
TARGETS_TIMEOUT_S = 20.0
SCRAPE_INTERVAL = "1s"
_APT_PACKAGES = ("prometheus",)
_METRICS_URL = re.compile(r"serves metrics at http://(\S+)/metrics")


# -- finding / installing ------------------------------------------------------


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/bin", "/usr/local/bin", "/usr/sbin"):
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _apt_install() -> str:
    return apt_install(*_APT_PACKAGES)


def _unavailable(reason: str) -> None:
    unavailable("prometheus and promtool (apt-get install prometheus)", reason)


def find_prometheus() -> tuple[str, str]:
    """``(prometheus, promtool)``, installed with apt-get if needed and possible."""
    prometheus, promtool = _which("prometheus"), _which("promtool")
    if prometheus is not None and promtool is not None:
        return prometheus, promtool
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable("prometheus/promtool not installed (and cannot apt-get install them: not root or no apt-get)")
    try:
        err = _apt_install()
    except (OSError, subprocess.SubprocessError) as exc:
        err = f"apt-get install failed: {exc!r}"
    prometheus, promtool = _which("prometheus"), _which("promtool")
    if prometheus is None or promtool is None:
        _unavailable(err or "prometheus/promtool still missing after apt-get install prometheus")
    assert prometheus is not None and promtool is not None
    return prometheus, promtool


def check_config(promtool: str, path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check config PATH`` (it parses and validates; it does not resolve target hostnames)."""
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=30)


# -- rendering -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_addr(p: DaemonProcess, timeout: float = 10.0) -> str:
    """``host:port`` of the daemon's /metrics, from the URL it logs at start-up (``--metrics-port 0``)."""
    found: list[str] = []

    def logged() -> bool:
        for line in list(p.stderr_lines):
            m = _METRICS_URL.search(line)
            if m:
                found.append(m.group(1))
                return True
        return False

    wait_for(logged, timeout=timeout, message=f"the metrics URL in the {p.role}'s log")
    return found[0]


def template_jobs(template: Path = TEMPLATE) -> dict[str, list[str]]:
    """Job name -> its static targets, as written in ``template``."""
    doc = yaml.safe_load(template.read_text())
    return {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc.get("targets", [])] for job in doc["scrape_configs"]}


def render_config(targets: Mapping[str, Sequence[str]], *, interval: str = SCRAPE_INTERVAL, template: Path = TEMPLATE) -> str:
    """The template's jobs, each scraping ``targets[job]`` instead of the compose services, every ``interval``.

    Raises ``ValueError`` unless ``targets`` names exactly the template's
    jobs: a test must not quietly drop a job the deployment scrapes.
    """
    doc: dict[str, Any] = yaml.safe_load(template.read_text())
    jobs = [job["job_name"] for job in doc["scrape_configs"]]
    if sorted(jobs) != sorted(targets):
        raise ValueError(f"targets name jobs {sorted(targets)}, the template has {sorted(jobs)}")
    glob = doc.setdefault("global", {}) or {}
    glob["scrape_interval"] = interval
    glob["evaluation_interval"] = interval
    glob.pop("scrape_timeout", None)  # defaults to the interval; a longer one would be invalid
    doc["global"] = glob
    for job in doc["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        job["static_configs"] = [{"targets": list(targets[job["job_name"]])}]
    header = f"# Rendered from {template.name} for a test: loopback targets, {interval} intervals.\n"
    return header + str(yaml.safe_dump(doc, sort_keys=False))


# -- running -------------------------------------------------------------------


class PrometheusError(AssertionError):
    """The Prometheus HTTP API answered with ``status: error`` (or not at all)."""


class PrometheusProcess:
    """``prometheus`` on ``127.0.0.1:<free port>`` with its config, TSDB and log under ``workdir``."""

    def __init__(self, binary: str, config_text: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(config_text)
        self.log_path = workdir / "prometheus.log"
        doc = yaml.safe_load(config_text)
        self.expected_targets = {
            (job["job_name"], t) for job in doc["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
        }
        self.listen = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def start(self, timeout: float = START_TIMEOUT_S) -> PrometheusProcess:
        """Start the server and wait (bounded) until ``/-/ready`` answers 200."""
        self.listen = f"127.0.0.1:{free_port()}"
        cmd = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.listen}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=info",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as resp:
                    if resp.status == 200:
                        return self
            except urllib.error.HTTPError as exc:  # 503 while starting up
                exc.close()
            except OSError:  # not listening yet (URLError is an OSError)
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus was not ready on {self.listen} within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL; bounded."""
        proc = self.proc
        if proc is None:
            return
        stop_process(proc, ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)))
        self.proc = None

    def __enter__(self) -> PrometheusProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP API ---------------------------------------------------------------

    def api(self, path: str, params: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """GET ``/api/v1/<path>``: the whole answer (``status``, ``data``, ``errorType``, ``error``, ``warnings``).

        Bad queries get HTTP 400/422 with a JSON body that says why: that body is returned too.
        """
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
                doc: dict[str, Any] = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            exc.close()
            try:
                doc = json.loads(body)
            except ValueError as err:
                raise PrometheusError(f"GET {url}: HTTP {exc.code}: {body[:500]!r}") from err
        return doc

    def query_raw(self, expr: str) -> dict[str, Any]:
        """An instant query at the current time: Prometheus' whole answer, errors included."""
        return self.api("query", {"query": expr})

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: its vector's samples (``metric`` labels, ``value`` = [time, "string"]).

        Raises ``PrometheusError`` if Prometheus rejects the query.
        """
        doc = self.query_raw(expr)
        if doc.get("status") != "success":
            raise PrometheusError(f"query {expr!r} failed: {doc.get('errorType')}: {doc.get('error')}")
        data = doc["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str) -> dict[str, float]:
        """An instant query's samples as ``{label set rendered as text: value}``."""
        out = {}
        for sample in self.query(expr):
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample["metric"].items()))
            out[labels] = float(sample["value"][1])
        return out

    def targets(self) -> list[dict[str, Any]]:
        doc = self.api("targets", {"state": "active"})
        if doc.get("status") != "success":
            raise PrometheusError(f"targets: {doc}")
        active: list[dict[str, Any]] = doc["data"]["activeTargets"]
        return active

    def wait_targets_up(self, timeout: float = TARGETS_TIMEOUT_S) -> list[dict[str, Any]]:
        """Wait until every target of the config has been scraped successfully (health ``up``)."""
        deadline = time.monotonic() + timeout
        active: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            active = self.targets()
            up = {(t["labels"].get("job"), t["labels"].get("instance")) for t in active if t.get("health") == "up"}
            if up >= self.expected_targets:
                return active
            time.sleep(0.1)
        state = [(t["labels"].get("job"), t["labels"].get("instance"), t.get("health"), t.get("lastError")) for t in active]
        raise AssertionError(
            f"targets not all up after {timeout}s; expected {sorted(self.expected_targets)}, got {state}\n{self.log()[-3000:]}"
        )

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus holds (``__name__`` values)."""
        doc = self.api("label/__name__/values")
        if doc.get("status") != "success":
            raise PrometheusError(f"label values: {doc}")
        return set(doc["data"])

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of ``label`` on the series ``match`` selects (what Grafana's ``label_values()`` asks)."""
        doc = self.api(f"label/{urllib.parse.quote(label)}/values", [("match[]", match)])
        if doc.get("status") != "success":
            raise PrometheusError(f"label values of {label} for {match}: {doc.get('error')}")
        values: list[str] = doc["data"]
        return values


def finite(samples: Sequence[dict[str, Any]]) -> bool:
    """True if there are samples and every value is a finite number."""
    return bool(samples) and all(math.isfinite(float(s["value"][1])) for s in samples)


def start_prometheus(workdir: Path, targets: Mapping[str, Sequence[str]]) -> PrometheusProcess:
    """Find Prometheus, render docker/prometheus.yml for ``targets``, check it with promtool, start it."""
    prometheus, promtool = find_prometheus()
    proc = PrometheusProcess(prometheus, render_config(targets), workdir)
    res = check_config(promtool, proc.config)
    if res.returncode != 0:
        raise AssertionError(f"promtool check config rejected the rendered config:\n{res.stdout}{res.stderr}\n{proc.config.read_text()}")
    return proc.start()
