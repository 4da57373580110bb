"""A real Prometheus scraping a real cluster with docker/prometheus.yml, and every query of the Grafana dashboard.

One module-scoped stack (1 master with a near cache, 2 aux nodes, the HTTP
shim, all with metrics, and Prometheus on the rendered docker/prometheus.yml scraping them
every second) serves the tests that need data; the config and provisioning
checks need none.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]  # no types-PyYAML in the venv
from prometheus_client.parser import text_string_to_metric_families

from dcache import Client
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, start_http
from tests.prometheus import (
    DASHBOARD,
    REPO,
    TEMPLATE,
    PrometheusProcess,
    check_config,
    find_prometheus,
    finite,
    metrics_addr,
    render_config,
    start_prometheus,
    template_jobs,
)

pytestmark = pytest.mark.slow

GRAFANA = REPO / "docker" / "grafana"
DATA_TIMEOUT_S = 20.0
#: Grafana's global variables, as the dashboard tests stand them in. $__rate_interval
#: is at least 4 scrape intervals in Grafana; 1m holds plenty of 1 s scrapes.
GRAFANA_GLOBALS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
_VARIABLE = re.compile(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\[\[(?P<old>\w+)(?::\w+)?\]\]|\$(?P<plain>\w+)")
_METRIC = re.compile(r"\b(?:dcache|process)_[a-zA-Z0-9_]+\b")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<match>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


class Stack:
    def __init__(self, cluster: Cluster, shim: DaemonProcess, prometheus: PrometheusProcess) -> None:
        self.cluster = cluster
        self.shim = shim
        self.prometheus = prometheus
        self.master = cluster.coordinator.addr
        self.http = f"http://{shim.addr}"
        self.round = 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    find_prometheus()  # skip or fail (under CI) before starting anything
    tmp = tmp_path_factory.mktemp("prometheus")
    cluster = Cluster(tmp / "cluster")
    shim: DaemonProcess | None = None
    prom: PrometheusProcess | None = None
    try:
        master = cluster.start_master("m1", "--metrics-port", "0", "--near-cache-size", "1MB")
        aux = [cluster.start_aux(node_id, "--metrics-port", "0") for node_id in ("a1", "a2")]
        asyncio.run(wait_ring(master.addr, settled({"a1", "a2"}), what="a1, a2 up"))
        shim = start_http(master.addr)
        targets = {
            "dcache-master": [metrics_addr(master)],
            "dcache-aux": [metrics_addr(a) for a in aux],
            "dcache-http": [shim.addr],  # the shim serves /metrics on its API port
        }
        prom = start_prometheus(tmp / "prom", targets)
        prom.wait_targets_up()
        yield Stack(cluster, shim, prom)
    except BaseException:
        print(cluster.logs() + ("\n--- http\n" + shim.stderr() if shim else "") + ("\n--- prometheus\n" + prom.log() if prom else ""))
        raise
    finally:
        if prom is not None:
            prom.stop()
        if shim is not None:
            shim.kill()
        cluster.stop()


async def drive(stack: Stack, keys: int = 150) -> None:
    """One round of load: sets, hits and misses through a master, a hot key, and a few HTTP requests through the shim.

    The hot key (read 64 times a round, far above the master's threshold of
    about 1 read in 4,000) fills the near cache and the hot-key gauge.

    The master samples 1 request in 64 for ``dcache_request_seconds``: a round
    gives every role a few samples.
    """
    stack.round += 1
    r = stack.round
    async with Client(stack.master, timeout=5.0) as c:
        assert all(await asyncio.gather(*(c.set(f"r{r}:k{i}", b"v" * 64) for i in range(keys))))
        hits = await asyncio.gather(*(c.get(f"r{r}:k{i}") for i in range(keys)))
        assert all(v == b"v" * 64 for v in hits)
        misses = await asyncio.gather(*(c.get(f"r{r}:missing{i}") for i in range(keys // 3)))
        assert all(v is None for v in misses)
        assert await c.set("hot", b"h")
        assert await asyncio.gather(*(c.get("hot") for _ in range(64))) == [b"h"] * 64
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for i in range(5):
            async with session.post(f"{stack.http}/data", json={"key": f"r{r}:h{i}", "value": "v"}) as resp:
                assert resp.status == 201
            async with session.get(f"{stack.http}/data/r{r}:h{i}") as resp:
                assert resp.status == 200
            async with session.get(f"{stack.http}/data/r{r}:nope{i}") as resp:
                assert resp.status == 404


T = TypeVar("T")


async def drive_until(stack: Stack, done: Callable[[], T | None], what: str, timeout: float = DATA_TIMEOUT_S) -> T:
    """Drive load rounds until ``done()`` (called in a thread: it queries Prometheus) returns non-None; bounded.

    rate() needs two scrapes after a series first moves, and a latency series
    appears only with its first sample, so the load keeps going while waiting.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(done)
        if last is not None:
            return last
        await drive(stack)
        await asyncio.sleep(0.3)  # about a third of a scrape interval between rounds
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{stack.prometheus.log()[-2000:]}")


# -- config files ---------------------------------------------------------------


def test_promtool_accepts_the_compose_config() -> None:
    _, promtool = find_prometheus()
    res = check_config(promtool, TEMPLATE)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = yaml.safe_load(TEMPLATE.read_text())
    assert doc["global"]["scrape_interval"] == "5s"
    assert template_jobs() == {
        "dcache-master": ["master1:9100", "master2:9100"],
        "dcache-aux": ["aux1:9101", "aux2:9101", "aux3:9101"],
        "dcache-http": ["http:8080"],
    }


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash.get("templating", {}).get("list", [])}


def _variable_query(var: dict[str, Any]) -> str:
    q = var.get("query", "")
    return str(q.get("query", "") if isinstance(q, dict) else q)


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(panel title, refId, expr)`` for every target of every panel, Grafana variables substituted.

    Template variables become their ``allValue`` (``.*``): the dashboard's
    "All" selection. A variable that is neither defined nor a Grafana global
    fails the test.
    """
    variables = _variables(dash)

    def substitute(expr: str, where: str) -> str:
        def one(m: re.Match[str]) -> str:
            name = m["braced"] or m["old"] or m["plain"]
            if name in GRAFANA_GLOBALS:
                return GRAFANA_GLOBALS[name]
            if name in variables:
                return str(variables[name].get("allValue") or ".*")
            raise AssertionError(f"{where}: ${name} is neither a dashboard variable nor a Grafana global we stand in for")

        return _VARIABLE.sub(one, expr)

    out = []
    for panel in _panels(dash["panels"]):
        for t in panel.get("targets", []):
            if t.get("hide"):
                continue
            where = f"panel {panel.get('title')!r} target {t.get('refId')}"
            assert t.get("expr"), f"{where} has no expr"
            out.append((panel["title"], t["refId"], substitute(t["expr"], where)))
    return out


def dashboard_legends(dash: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """``(panel title, refId)`` -> the labels its ``legendFormat`` shows (``{{label}}``)."""
    return {
        (panel["title"], t["refId"]): _LEGEND_LABEL.findall(t.get("legendFormat", ""))
        for panel in _panels(dash["panels"])
        for t in panel.get("targets", [])
    }


def label_names(expr: str) -> set[str]:
    """The label names ``expr`` selects or groups by: ``{name=...}`` matchers, ``by``/``without``/``on``/``ignoring`` lists."""
    names = {m for sel in _SELECTOR.findall(expr) for m in _MATCHER.findall(sel)}
    names |= {n.strip() for group in _GROUPING.findall(expr) for n in group.split(",") if n.strip()}
    return names


def test_dashboard_and_provisioning_are_consistent() -> None:
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [ds] = datasource["datasources"]
    assert (ds["name"], ds["type"], ds["uid"], ds["url"]) == ("Prometheus", "prometheus", "prometheus", "http://prometheus:9090")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dcache.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"

    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    types = {p["type"] for p in panels}
    assert {"timeseries", "stat"} <= types <= {"timeseries", "stat", "row", "bargauge", "gauge", "table", "text"}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"]) == p["datasource"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
    for var in _variables(dash).values():
        assert var["datasource"] == {"type": "prometheus", "uid": ds["uid"]}
        assert _LABEL_VALUES.match(_variable_query(var)), var
    raw = [t["expr"] for p in panels for t in p.get("targets", [])]
    windows = {w for e in raw for w in re.findall(r"\[([^\]\[]+)\]", e)}
    assert windows == {"$__rate_interval"}, f"range windows must be $__rate_interval, found {windows}"
    exprs = [e for _, _, e in dashboard_exprs(dash)]
    # The panels the dashboard promises.
    text = " ".join(exprs)
    for needed in (
        "dcache_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(dcache_request_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(dcache_request_seconds_bucket",
        "dcache_cache_hits_total",
        "dcache_cache_misses_total",
        "dcache_cache_bytes",
        "dcache_cache_items",
        "dcache_cache_evictions_total",
        "dcache_ring_members",
        "dcache_aux_up",
        "dcache_migration_streams_done",
        "dcache_snapshot_age_seconds",
        "dcache_near_cache_hits_total",
        "dcache_near_cache_invalidations_total",
        "dcache_tracking_keys",
        "dcache_hot_key_reads_per_second",
        # What a newcomer needs in an incident: daemons down, errors by kind, memory against its budget, the near cache.
        "min by (job, instance) (up{",
        "dcache_unavailable_total",
        "dcache_upstream_failures_total",
        "dcache_connections_rejected_total",
        'status=~"5.."',
        "dcache_cache_max_bytes",
        "dcache_migration_streams{",
        "dcache_near_cache_misses_total",
    ):
        assert needed in text, needed


# -- against the live stack ---------------------------------------------------------

RATE = 'sum by (op) (rate(dcache_requests_total{role="master"}[15s]))'
P99 = 'histogram_quantile(0.99, sum by (le) (rate(dcache_request_seconds_bucket{role="master"}[15s])))'
AUX_P99 = 'histogram_quantile(0.99, sum by (le) (rate(dcache_request_seconds_bucket{role="aux"}[15s])))'
_HITS = "sum(rate(dcache_cache_hits_total[15s]))"
HIT_RATIO = f"{_HITS} / ({_HITS} + sum(rate(dcache_cache_misses_total[15s])))"
HTTP_RATE = "sum by (route) (rate(dcache_http_requests_total[15s]))"
HTTP_P99 = "histogram_quantile(0.99, sum by (le) (rate(dcache_http_request_duration_seconds_bucket[15s])))"


async def test_prometheus_scrapes_every_job(stack: Stack) -> None:
    prom = stack.prometheus
    ups = await asyncio.to_thread(prom.query, "up")
    assert {(s["metric"]["job"], s["value"][1]) for s in ups} == {("dcache-master", "1"), ("dcache-aux", "1"), ("dcache-http", "1")}
    assert len(ups) == 4
    queries = (RATE, P99, AUX_P99, HIT_RATIO, HTTP_RATE, HTTP_P99)

    def all_finite() -> dict[str, list[dict[str, Any]]] | None:
        results = {q: prom.query(q) for q in queries}
        return results if all(finite(r) for r in results.values()) else None

    results = await drive_until(stack, all_finite, "request rate, p99 latency and hit ratio to be finite")
    rates = {s["metric"]["op"]: float(s["value"][1]) for s in results[RATE]}
    assert rates["set"] > 0 and rates["get"] > 0, rates
    for q in (P99, AUX_P99, HTTP_P99):
        [sample] = results[q]
        assert 0 < float(sample["value"][1]) <= 5.0, (q, sample)  # within the finite buckets
    [ratio] = results[HIT_RATIO]
    assert 0 < float(ratio["value"][1]) < 1, ratio  # every round has hits and misses
    routes = {s["metric"]["route"] for s in results[HTTP_RATE]}
    assert {"/data", "/data/{key}"} <= routes, routes


async def test_every_dashboard_query_runs(stack: Stack) -> None:
    """Every expr of docker/grafana/dashboards/dcache.json is valid PromQL, names real metrics and finds series."""
    prom = stack.prometheus
    dash = _dashboard()
    exprs = dashboard_exprs(dash)
    assert len(exprs) >= 20

    referenced = {name for _, _, e in exprs for name in _METRIC.findall(e)}
    assert referenced, "the dashboard references no dcache metric"
    Answer = tuple[str, str, str, dict[str, Any]]
    last: dict[str, Any] = {"got": [], "missing": sorted(referenced)}

    def all_have_data() -> list[Answer] | None:
        got = [(title, ref, e, prom.query_raw(e)) for title, ref, e in exprs]
        last["got"], last["missing"] = got, sorted(referenced - prom.metric_names())
        if any(doc.get("status") != "success" for *_, doc in got):
            return got  # a query error will not go away by waiting: reported below
        return got if not last["missing"] and all(doc["data"]["result"] for *_, doc in got) else None

    try:
        got = await drive_until(stack, all_have_data, "every dashboard query to return series")
    except AssertionError as exc:
        empty = "\n".join(f"  {title} [{ref}] {e}" for title, ref, e, doc in last["got"] if not doc.get("data", {}).get("result"))
        raise AssertionError(
            f"{exc}\nmetrics the dashboard uses that no daemon exports: {last['missing']}\nqueries without series:\n{empty}"
        ) from None
    errors = [
        f"{title} [{ref}] {e}: {doc.get('errorType')}: {doc.get('error')}" for title, ref, e, doc in got if doc.get("status") != "success"
    ]
    assert not errors, "\n".join(errors)
    legends = dashboard_legends(dash)
    for title, ref, e, doc in got:
        assert doc["data"]["resultType"] in ("vector", "scalar"), (title, ref, doc)
        for sample in doc["data"]["result"]:
            lost = [label for label in legends[(title, ref)] if label not in sample["metric"]]
            assert not lost, f"{title} [{ref}]: its legend shows {lost}, which {e} does not keep: {sample['metric']}"
        for sample in doc["data"]["result"]:
            # NaN is fine (a quantile or ratio over an idle window), an infinity is a bug in the query.
            assert not math.isinf(float(sample["value"][1])), (title, ref, e, sample)

    for name, var in _variables(dash).items():
        m = _LABEL_VALUES.match(_variable_query(var))
        assert m is not None, var
        values = await asyncio.to_thread(prom.label_values, m["label"], m["match"])
        assert values, f"variable ${name}: {_variable_query(var)} found nothing"
    aux_values = await asyncio.to_thread(prom.label_values, "instance", "dcache_cache_items")
    assert len(aux_values) == 2


def test_rendered_config_keeps_the_jobs(tmp_path: Path) -> None:
    _, promtool = find_prometheus()
    targets = {"dcache-master": ["127.0.0.1:1"], "dcache-aux": ["127.0.0.1:2", "127.0.0.1:3"], "dcache-http": ["127.0.0.1:4"]}
    text = render_config(targets)
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    res = check_config(promtool, path)
    assert res.returncode == 0, res.stdout + res.stderr + text
    doc = yaml.safe_load(text)
    assert doc["global"]["scrape_interval"] == doc["global"]["evaluation_interval"] == "1s"
    assert {j["job_name"]: j["static_configs"] for j in doc["scrape_configs"]} == {k: [{"targets": v}] for k, v in targets.items()}
    with pytest.raises(ValueError, match="dcache-http"):
        render_config({"dcache-master": [], "dcache-aux": []})


def test_dashboard_labels_exist_on_the_daemons(stack: Stack) -> None:
    """Every label a dashboard query selects or groups by is a label of a metric it names, on a real scrape of each role.

    A misspelt label in a matcher or a ``by (...)`` still returns series (one
    without the label), so the live test above cannot catch it.
    """
    daemons = [metrics_addr(stack.cluster.coordinator), *(metrics_addr(a) for a in stack.cluster.aux.values()), stack.shim.addr]
    labels: dict[str, set[str]] = {"up": set()}  # Prometheus's own: only the target labels
    for addr in daemons:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    for title, ref, e in dashboard_exprs(_dashboard()):
        names = set(_METRIC.findall(e)) | ({"up"} if re.search(r"\bup\{", e) else set())
        assert names, f"{title} [{ref}] names no metric: {e}"
        unknown = names - set(labels)
        assert not unknown, f"{title} [{ref}]: no daemon exports {sorted(unknown)} ({e})"
        known = TARGET_LABELS.union(*(labels[n] for n in names))
        assert label_names(e) <= known, f"{title} [{ref}]: labels {sorted(label_names(e) - known)} are on none of {sorted(names)} ({e})"
