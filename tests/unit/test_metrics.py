"""Metrics: the collectors read in-process nodes (never started) and match docs/METRICS.md."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dcache.auxnode.node import AuxNode
from dcache.config import AuxConfig, MasterConfig
from dcache.master.node import MasterNode
from dcache.metrics import registry_for
from dcache.protocol import HEADER, Op
from dcache.server import LATENCY_BUCKETS, UNKNOWN_OP, FrameProtocol, Histogram
from tests.fakes import FakeTransport

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
_ROW = re.compile(r"^\| `(dcache_[a-z_]+)` \| (counter|gauge|histogram) \|\s*([a-z_, ]*?)\s*\|")


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, labels) from the tables of docs/METRICS.md."""
    out = {}
    for line in DOC.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            labels = tuple(sorted(x.strip() for x in m.group(3).split(",") if x.strip()))
            assert m.group(1) not in out, f"{m.group(1)} documented twice"
            out[m.group(1)] = (m.group(2), labels)
    return out


def exported(collector: Any) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """name (as exposed: counters with _total) -> (type, labels or None if no sample), through the text format."""
    text = generate_latest(registry_for(collector, process=False)).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels: set[str] = set()
        for s in fam.samples:
            labels |= set(s.labels) - {"le"}
        out[name] = (fam.type, tuple(sorted(labels)) if fam.samples else None)
    return out


def frames(*msgs: Any) -> bytes:
    out = []
    for m in msgs:
        body = msgpack.packb(m, use_bin_type=True)
        out.append(HEADER.pack(len(body)) + body)
    return b"".join(out)


def connect(node: Any) -> tuple[FrameProtocol, FakeTransport]:
    proto = node.protocol_factory()
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport


def samples(collector: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry_for(collector, process=False)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 1]
    assert h.sum == pytest.approx(4.65)
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


async def test_aux_collector_counts_requests_errors_and_cache() -> None:
    node = AuxNode(AuxConfig(node_id="t-aux"))
    proto, transport = connect(node)
    n_get = 200  # enough to cross the 1-in-64 sample several times
    msgs: list[Any] = [[int(Op.SET), 1, b"k", b"v"]]
    msgs += [[int(Op.GET), 10 + i, b"k" if i % 2 else b"missing"] for i in range(n_get)]
    msgs += [[99, 5000], "not an array", [int(Op.INCR), 5001, b"k"]]  # unknown op, bad frame, not an integer
    for i in range(0, len(msgs), 7):  # several batches
        proto.data_received(frames(*msgs[i : i + 7]))
    assert transport.written
    assert node.requests_total == len(msgs)
    assert sum(node.op_requests.values()) == node.requests_total
    assert sum(node.op_errors.values()) == node.errors_total == 3

    s = samples(node.collector())
    assert s[("dcache_requests_total", (("op", "get"), ("role", "aux")))] == n_get
    assert s[("dcache_requests_total", (("op", "set"), ("role", "aux")))] == 1
    assert s[("dcache_requests_total", (("op", "unknown"), ("role", "aux")))] == 2
    assert s[("dcache_errors_total", (("op", "unknown"), ("role", "aux")))] == 2
    assert s[("dcache_errors_total", (("op", "incr"), ("role", "aux")))] == 1
    assert s[("dcache_errors_total", (("op", "get"), ("role", "aux")))] == 0
    assert s[("dcache_requests_total", (("op", "scan"), ("role", "aux")))] == 0  # served ops are always present
    assert s[("dcache_cache_hits_total", ())] == n_get // 2
    assert s[("dcache_cache_misses_total", ())] == n_get // 2
    assert s[("dcache_cache_items", ())] == 1
    assert s[("dcache_cache_bytes", ())] > 0
    assert s[("dcache_connections", (("role", "aux"),))] == 1
    batches = -(-len(msgs) // 7)
    assert s[("dcache_batch_seconds_count", (("role", "aux"),))] == batches
    assert s[("dcache_batch_seconds_bucket", (("le", "+Inf"), ("role", "aux")))] == batches
    sampled = sum(v for (name, _), v in s.items() if name == "dcache_request_seconds_count")
    assert sampled == len(msgs) // 64
    assert node.op_requests[UNKNOWN_OP] == 2


async def test_protocol_error_counted() -> None:
    node = AuxNode(AuxConfig(node_id="t-aux"))
    proto, _ = connect(node)
    proto.data_received(b"\xff\xff\xff\xff garbage")
    s = samples(node.collector())
    assert s[("dcache_protocol_errors_total", (("role", "aux"),))] == 1


def test_aux_exports_what_the_docs_list() -> None:
    docs = documented()
    got = exported(AuxNode(AuxConfig(node_id="t-aux")).collector())
    aux_section = {n for n in docs if n not in _master_only(docs) | _section("RESP front door (`--resp-port`)", docs)}
    assert set(got) == aux_section, f"undocumented: {set(got) - aux_section}; missing: {aux_section - set(got)}"
    for name, (kind, labels) in got.items():
        assert docs[name] == (kind, docs[name][1] if labels is None else labels), name


def _master_node() -> MasterNode:
    node = MasterNode(MasterConfig(node_id="t-master", aux=(("a1", "127.0.0.1", 1), ("a2", "127.0.0.1", 2))))
    node._on_view(node.membership.view)  # the links, as start() makes them (not connected)
    return node


def _section(name: str, docs: dict[str, Any]) -> set[str]:
    """The metrics documented in the ``## name`` section."""
    text = DOC.read_text()
    start = text.index(f"## {name}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end] if end >= 0 else text[start:]
    return {n for n in docs if f"`{n}`" in body}


def _master_only(docs: dict[str, Any]) -> set[str]:
    return _section("Masters", docs) | _section("HTTP shim", docs)


async def test_master_exports_what_the_docs_list() -> None:
    docs = documented()
    node = _master_node()
    got = exported(node.collector())
    text = DOC.read_text()
    aux_only = {n for n in docs if f"`{n}`" in text[text.index("## Aux nodes") : text.index("## Masters")]}
    zk_only = {n for n in docs if n.startswith("dcache_zookeeper_")}
    master_set = set(docs) - aux_only - zk_only - _section("HTTP shim", docs) - _section("RESP front door (`--resp-port`)", docs)
    assert set(got) == master_set, f"undocumented: {set(got) - master_set}; missing: {master_set - set(got)}"
    for name, (kind, labels) in got.items():
        assert docs[name] == (kind, docs[name][1] if labels is None else labels), name


async def test_resp_exports_what_the_docs_list() -> None:
    from dcache.respserver import COMMAND_NAMES, RespStats

    docs = documented()
    node = AuxNode(AuxConfig(node_id="t-aux"))
    before = set(exported(node.collector()))
    node.resp_stats = RespStats([*COMMAND_NAMES, "unknown"])
    node.resp_stats.commands["GET"] += 3
    got = exported(node.collector())
    resp = _section("RESP front door (`--resp-port`)", docs)
    assert set(got) - before == resp
    for name in resp:
        assert docs[name] == got[name], name
    s = samples(node.collector())
    assert s[("dcache_resp_commands_total", (("command", "get"), ("role", "aux")))] == 3
    assert {dict(k[1])["command"] for k in s if k[0] == "dcache_resp_commands_total"} == {n.lower() for n in COMMAND_NAMES} | {"unknown"}


async def test_zookeeper_master_exports_its_connection_state() -> None:
    docs = documented()
    node = MasterNode(MasterConfig(node_id="t-master", zookeeper="127.0.0.1:1", cluster="t"))  # not started: not connected
    got = exported(node.collector())
    zk_only = {n for n in docs if n.startswith("dcache_zookeeper_")}
    assert len(zk_only) == 3 and zk_only <= set(got)
    s = samples(node.collector())
    assert s[("dcache_zookeeper_connected", ())] == 0
    assert s[("dcache_coordinating", ())] == 0  # not the leader (yet)


async def test_master_collector_values() -> None:
    node = _master_node()
    node.router.stats.fallbacks = 3
    node.router.stats.hits, node.router.stats.misses = 11, 5
    node.links["a1"].requests = 7
    s = samples(node.collector())
    assert s[("dcache_ring_epoch", ())] == node.router.view.epoch > 0
    assert s[("dcache_ring_members", (("state", "up"),))] == 2
    assert s[("dcache_ring_members", (("state", "down"),))] == 0
    assert s[("dcache_aux_up", (("node", "a1"),))] == 1
    assert s[("dcache_migrating", ())] == 0
    assert s[("dcache_read_fallbacks_total", ())] == 3
    assert s[("dcache_read_hits_total", ())] == 11 and s[("dcache_read_misses_total", ())] == 5
    assert s[("dcache_upstream_requests_total", (("node", "a1"),))] == 7
    assert s[("dcache_upstream_connections", (("node", "a1"),))] == 0
    assert s[("dcache_upstream_pool_size", (("node", "a2"),))] == node.config.aux_connections
    assert s[("dcache_migrations_total", ())] == 0


async def test_master_counts_unavailable_errors_by_op() -> None:
    node = MasterNode(MasterConfig(node_id="t-master"))  # no aux node: every key is unavailable
    proto, _ = connect(node)
    proto.data_received(frames([int(Op.GET), 1, b"k"], [int(Op.SET), 2, b"k", b"v"], [int(Op.PING), 3]))
    assert node.op_requests[int(Op.GET)] == node.op_requests[int(Op.SET)] == node.op_requests[int(Op.PING)] == 1
    assert node.op_errors[int(Op.GET)] == node.op_errors[int(Op.SET)] == 1
    assert node.op_errors[int(Op.PING)] == 0
    assert node.router.stats.unavailable == 2


def test_documented_names_follow_conventions() -> None:
    for name, (kind, _) in documented().items():
        assert name.startswith("dcache_")
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def test_http_shim_exports_what_the_docs_list() -> None:
    from dcache.http._metrics import HttpMetrics

    docs = documented()
    m = HttpMetrics()
    m.observe("GET", "/data/{key}", 200, 0.001)
    got = exported(m)
    shim = _section("HTTP shim", docs)
    assert set(got) == shim, f"undocumented: {set(got) - shim}; missing: {shim - set(got)}"
    for name, (kind, labels) in got.items():
        assert docs[name] == (kind, docs[name][1] if labels is None else labels), name


async def test_master_near_cache_families_are_zero_while_it_is_off() -> None:
    node = MasterNode(MasterConfig(node_id="t-master", aux=(("a1", "127.0.0.1", 1),), near_cache_size=0))
    assert node.router.near is None
    s = samples(node.collector())
    for name in ("hits", "misses", "fills", "fills_discarded", "invalidations", "evictions", "lease_lapses"):
        assert s[(f"dcache_near_cache_{name}_total", ())] == 0, name
    assert s[("dcache_near_cache_max_bytes", ())] == s[("dcache_near_cache_keys", ())] == 0
    assert not [k for k in s if k[0] == "dcache_hot_key_reads_per_second"]  # no key read yet


async def test_master_near_cache_and_hot_key_values() -> None:
    from dcache.master.metrics import HOT_KEY_LABEL_CHARS, HOT_KEYS_SHOWN
    from dcache.master.nearcache import HotKeys

    node = MasterNode(MasterConfig(node_id="t-master", near_cache_size=1 << 20))
    near = node.router.near
    assert near is not None and near.hot is node.router.hot
    near.hot = node.router.hot = HotKeys(sample=1)  # every read counted: exact ranks
    near.hits, near.misses, near.lease_lapses = 5, 7, 2
    long_a, long_b = b"L" * 300 + b"a", b"L" * 300 + b"b"  # the same label once cut: only the hotter shows
    odd = b"\xffodd\nkey"
    keys = [f"k{i}".encode() for i in range(20)] + [long_a, long_b, odd]
    for i, key in enumerate(keys):
        for _ in range(64 + 8 * i):  # hotter and hotter: the last keys are the hottest
            near.hot.note(key)
    s = samples(node.collector())
    assert s[("dcache_near_cache_hits_total", ())] == 5 and s[("dcache_near_cache_misses_total", ())] == 7
    assert s[("dcache_near_cache_lease_lapses_total", ())] == 2
    assert s[("dcache_near_cache_max_bytes", ())] == 1 << 20
    hot = {dict(labels)["key"]: v for (name, labels), v in s.items() if name == "dcache_hot_key_reads_per_second"}
    assert len(hot) == HOT_KEYS_SHOWN - 1  # long_a and long_b share a label
    assert "\\xffodd\\nkey" in hot and all(v > 0 for v in hot.values())
    cut = "L" * (HOT_KEY_LABEL_CHARS - 3) + "..."
    assert cut in hot and max(map(len, hot)) == HOT_KEY_LABEL_CHARS
    assert hot["\\xffodd\\nkey"] >= hot[cut] >= hot["k19"] > 0
    assert "k0" not in hot  # the coldest are not shown


async def test_aux_collector_tracking_values() -> None:
    node = AuxNode(AuxConfig(node_id="t-aux", tracking_keys=7))
    proto, transport = connect(node)
    proto.data_received(frames([int(Op.SET), 1, b"k", b"v"], [int(Op.GETV), 2, b"k", True]))
    s = samples(node.collector())
    assert s[("dcache_tracking_keys", ())] == 1 and s[("dcache_tracking_max_keys", ())] == 7
    assert s[("dcache_tracking_subscribers", ())] == 1
    proto.data_received(frames([int(Op.SET), 3, b"k", b"v2"]))  # its answer waits for the INVACK
    for _ in range(3):  # the push is formed at the end of the iteration, then flushed
        await asyncio.sleep(0)
    [push] = [f for f in transport.frames() if f[0] == -1]
    assert not [f for f in transport.frames() if f[0] == 3]
    proto.data_received(frames([int(Op.INVACK), 4, push[2][0]]))
    assert [f for f in transport.frames() if f[0] == 3] == [[3, 0, True]]
    s = samples(node.collector())
    assert s[("dcache_tracking_keys", ())] == 0
    assert s[("dcache_tracking_invalidations_total", ())] == s[("dcache_tracking_pushes_total", ())] == 1
    assert s[("dcache_tracking_answers_held_total", ())] == 1
    assert s[("dcache_tracking_overflows_total", ())] == s[("dcache_tracking_timeouts_total", ())] == 0
