"""The C ``Entry`` (dcache/lru/_entry.c): the pure-Python one's behaviour, in less memory.

The cache's own tests (test_cache.py, test_cache_statemachine.py) run on
whichever entry is the default: the C one where it was built. The last test
here runs them again in a process that has ``DCACHE_PURE_PYTHON=1``, as an
install without a C compiler would.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcache.lru import CPYTHON_COST, LRUCache
from dcache.lru.cache import VERSION_BIAS, NativeEntry, PyEntry
from tests.harness import unavailable

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def native() -> type[PyEntry]:
    if NativeEntry is None:
        unavailable("the C extension dcache.lru._entry", "not built (make install builds it; it needs gcc and Python.h)")
    assert NativeEntry is not None
    return NativeEntry


def test_the_c_entry_is_what_caches_use_by_default(native: type[PyEntry]) -> None:
    cache = LRUCache(10_000)
    cache.set(b"k", b"v")
    assert type(cache.get_entry(b"k")) is native
    assert CPYTHON_COST.packed
    cache.check_valid()  # the shard maps the entry to itself


def test_an_entry_is_80_bytes_of_object_whatever_its_key_and_value(native: type[PyEntry]) -> None:
    """The layout the memory figures rest on (docs/DECISIONS.md): GC header, object header, 5 pointers, 2 lengths."""
    assert sys.getsizeof(native(b"", b"")) == 80
    e = native(b"k" * 16, b"v" * 100)
    assert sys.getsizeof(e) == 80 + 116  # __sizeof__ adds the buffer's bytes


@given(key=st.binary(max_size=64), value=st.binary(max_size=300), expires_at=st.integers(0, 2**63 - 1), version=st.integers(0, 2**64 - 1))
def test_the_c_entry_reads_as_the_python_one(key: bytes, value: bytes, expires_at: int, version: int) -> None:
    if NativeEntry is None:
        unavailable("the C extension dcache.lru._entry", "not built")
    assert NativeEntry is not None
    c, p = NativeEntry(key, value, expires_at, version), PyEntry(key, value, expires_at, version)
    for e in (c, p):
        assert (e.key, e.value, e.expires_at, e.version, e._version) == (key, value, expires_at, version, version - VERSION_BIAS)
    assert repr(c) == repr(p)
    assert hash(c) == hash(key)
    ck: object = c  # it compares with bytes, which its type (PyEntry's, for mypy) does not say
    assert ck == key and key == ck and not (ck != key) and c == NativeEntry(key, b"other")
    assert ck != key + b"x" and key + b"x" != ck and ck != bytearray(key) + b"x"
    assert {ck: c}.get(bytes(bytearray(key))) is c  # a dict keyed by entries is looked up with keys


@given(first=st.binary(max_size=200), second=st.binary(max_size=200))
def test_a_new_value_replaces_the_old_whatever_their_lengths(first: bytes, second: bytes) -> None:
    if NativeEntry is None:
        unavailable("the C extension dcache.lru._entry", "not built")
    assert NativeEntry is not None
    e = NativeEntry(b"key", first)
    e.value = second
    assert e.value == second and e.key == b"key" and hash(e) == hash(b"key")


def test_versions_cover_the_protocols_range_and_no_more(native: type[PyEntry]) -> None:
    e = native(b"k", b"v")
    for v in (0, 1, VERSION_BIAS - 1, VERSION_BIAS, 2**63 - 1, 2**63, 2**64 - 1):
        e._version = v - VERSION_BIAS
        assert e.version == v
        e.version = v
        assert e._version == v - VERSION_BIAS
    for bad in (-1, 2**64):
        with pytest.raises(OverflowError):
            native(b"k", b"v", 0, bad)
        with pytest.raises(OverflowError):
            e.version = bad
        with pytest.raises(OverflowError):
            e._version = bad - VERSION_BIAS
    assert e.version == 2**64 - 1  # the failed writes changed nothing


def test_wrong_types_are_refused_with_the_errors_python_gives(native: type[PyEntry]) -> None:
    with pytest.raises(TypeError):
        native("k", b"v")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native(b"k", bytearray(b"v"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native(b"k", b"v", 1.5)  # type: ignore[arg-type]
    e = native(b"k", b"v")
    with pytest.raises(TypeError):
        e.value = "v"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        e._version = 1.0  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        del e.value
    with pytest.raises(AttributeError):
        e.prev  # noqa: B018  (unset link, as on an unlinked Python entry)
    with pytest.raises(AttributeError):
        e.key = b"other"  # read-only on the C entry
    with pytest.raises(AttributeError):
        e.other = 1  # type: ignore[attr-defined]
    assert e.value == b"v" and e.key == b"k"


def test_a_key_snapshot_reads_as_bytes_and_outlives_the_changes_after_it(native: type[PyEntry]) -> None:
    """A migration's scan walks it for seconds while writes go on: it must keep the keys it began with, as bytes."""
    cache = LRUCache(1 << 30, native=True)
    for i in range(1000):
        cache.set(b"k%d" % i, b"v" * 50)
    keys = cache.keys_snapshot()
    for i in range(0, 1000, 2):
        cache.delete(b"k%d" % i)
    cache.set(b"new", b"x")
    assert len(keys) == 1000 and sorted(keys) == sorted(b"k%d" % i for i in range(1000))
    assert all(type(k) is bytes for k in keys[10:20]) and type(keys[3]) is bytes and keys[-1] == keys[999]
    assert sorted(k for k in keys if cache.get_entry(k) is not None) == sorted(b"k%d" % i for i in range(1, 1000, 2))
    cache.check_valid()


def test_a_dropped_list_of_entries_is_freed_without_exhausting_the_stack(native: type[PyEntry]) -> None:
    """The links are reference cycles: the GC frees them, and the trashcan bounds the recursion of a long chain."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        head = native(b"", b"")
        head.prev = head.next = head
        for i in range(200_000):
            e = native(b"key:%d" % i, b"v" * 100)
            last = head.prev
            last.next = e
            e.prev = last
            e.next = head
            head.prev = e
        grown = tracemalloc.get_traced_memory()[0] - before
        del head, e, last
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown > 200_000 * 150  # 80 bytes of object and a buffer of 105-111
    assert left < 200_000  # every entry and buffer given back
    # and one freed by reference counting alone, through a chain of owned links
    first = native(b"0", b"")
    e = first
    for i in range(1, 300_000):
        n = native(b"%d" % i, b"")
        e.next = n
        e = n
    del first, e, n  # no crash: the trashcan unwinds the chain


def test_the_caches_tests_pass_on_the_pure_python_entry() -> None:
    """What an install without a C compiler runs: the LRU's own tests, unchanged, on ``PyEntry``."""
    env = {**os.environ, "DCACHE_PURE_PYTHON": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", "import dcache.lru as l; print(l.Entry.__name__, l.CPYTHON_COST.packed)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.split() == ["PyEntry", "False"]
    tests = ["tests/unit/lru/test_cache.py", "tests/unit/lru/test_cache_statemachine.py", "tests/unit/lru/test_snapshot.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_an_aux_node_without_the_c_entry_says_so_at_start(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An operator sizing --max-memory must know when keys take a third more memory than the docs' figures."""
    from dcache.auxnode import node as aux_node
    from dcache.config import AuxConfig

    with caplog.at_level("WARNING", logger="dcache.aux"):
        aux_node.AuxNode(AuxConfig(node_id="with-c"))
    assert not [r for r in caplog.records if "C entry" in r.getMessage()] or NativeEntry is None
    caplog.clear()
    monkeypatch.setattr(aux_node, "NATIVE_MISSING", "turned off by DCACHE_PURE_PYTHON")
    with caplog.at_level("WARNING", logger="dcache.aux"):
        aux_node.AuxNode(AuxConfig(node_id="without"))
    (record,) = [r for r in caplog.records if "C entry" in r.getMessage()]
    assert record.levelname == "WARNING" and "turned off by DCACHE_PURE_PYTHON" in record.getMessage()
