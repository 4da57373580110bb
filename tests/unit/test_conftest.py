"""The unit suite's conftest: async tests run on both loops, and a call to the loop's exception handler fails a test."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import uvloop

ROOT = Path(__file__).resolve().parents[2]


async def test_runs_on_the_loop_its_id_names(request: pytest.FixtureRequest) -> None:
    loop = asyncio.get_running_loop()
    if request.node.callspec.id == "uvloop":
        assert isinstance(loop, uvloop.Loop)
    else:
        assert request.node.callspec.id == "asyncio"
        assert isinstance(loop, asyncio.SelectorEventLoop)
    assert loop.get_exception_handler() is not None


_INNER = """
import asyncio


async def test_callback_raises():
    asyncio.get_running_loop().call_soon(lambda: 1 / 0)
    await asyncio.sleep(0)


async def test_task_exception_never_retrieved():
    async def boom():
        raise ValueError("lost")

    asyncio.ensure_future(boom())
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_task_that_raises_when_cancelled_at_loop_close():
    async def stubborn():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("bad cleanup") from None

    asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)


async def test_clean():
    await asyncio.sleep(0)


def test_sync():
    pass
"""


def test_exception_handler_calls_fail_the_test_that_caused_them(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.unit.conftest import *  # noqa: F403\n")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(_INNER))
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    args = ["-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto"]
    args += ["-o", "asyncio_default_fixture_loop_scope=function", f"--junit-xml={report}", "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "test_inner.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    outcomes: dict[str, set[str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case if child.tag in ("failure", "error")}
        outcomes.setdefault(case.attrib["name"], set()).update(kinds or {"passed"})
    assert outcomes == {
        "test_callback_raises[asyncio]": {"failure"},
        "test_callback_raises[uvloop]": {"failure"},
        "test_task_exception_never_retrieved[asyncio]": {"failure"},
        "test_task_exception_never_retrieved[uvloop]": {"failure"},
        # raised while the runner closes the loop, in the test's teardown
        "test_task_that_raises_when_cancelled_at_loop_close[asyncio]": {"error"},
        "test_task_that_raises_when_cancelled_at_loop_close[uvloop]": {"error"},
        "test_clean[asyncio]": {"passed"},
        "test_clean[uvloop]": {"passed"},
        "test_sync": {"passed"},
    }
    assert "exception handler was called" in proc.stdout
