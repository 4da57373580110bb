"""Every async unit test runs twice, on asyncio's own loop and on uvloop, and the loop's exception handler must stay silent.

The loops come from pytest-asyncio's ``pytest_asyncio_loop_factories`` hook,
so each ``async def`` test (and its async fixtures) is parametrized
``[asyncio]`` / ``[uvloop]`` and gets a fresh loop of that kind.

Every loop made here reports to ``_handler_calls`` whatever reaches its
exception handler: a callback that raised, a task whose exception nobody
retrieved, a task still pending when the loop closed with an error... Such
a call is a bug the test did not see (the default handler only logs it), so
it fails the test: in the call phase if it happened while the test ran, at
teardown if it happened while the loop was shut down (pytest-asyncio closes
the loop, cancelling what is left, in the teardown of its runner fixture).
A call made after the test's teardown (a task collected later) fails the
session and names the test whose loop it was.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Generator, Mapping
from typing import Any

import pytest
import uvloop

#: Exception handler calls not yet reported: (nodeid of the test that made the loop, context).
_handler_calls: list[tuple[str, dict[str, Any]]] = []
#: The test being run (whose loops the factories make).
_current: list[str] = [""]


def _watched(make: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], asyncio.AbstractEventLoop]:
    def factory() -> asyncio.AbstractEventLoop:
        loop = make()
        owner = _current[0]

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            _handler_calls.append((owner, context))
            loop.default_exception_handler(context)  # still logged, with the traceback

        loop.set_exception_handler(handler)
        return loop

    return factory


_FACTORIES = {"asyncio": _watched(asyncio.SelectorEventLoop), "uvloop": _watched(uvloop.new_event_loop)}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return _FACTORIES


def _describe(calls: list[tuple[str, dict[str, Any]]]) -> str:
    lines = []
    for owner, context in calls:
        exc = context.get("exception")
        what = f"{context.get('message', '')}" + (f": {exc.__class__.__name__}: {exc}" if exc is not None else "")
        lines.append(f"  [loop of {owner}] {what}")
    return "the event loop's exception handler was called:\n" + "\n".join(lines)


def _check() -> None:
    if _handler_calls:
        calls = list(_handler_calls)
        _handler_calls.clear()
        pytest.fail(_describe(calls), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    _current[0] = item.nodeid
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    result = yield  # a failing test raises here: its own failure is the one reported
    _check()
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    result = yield
    _check()
    _current[0] = ""
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()  # tasks in reference cycles report "destroyed but pending" only when collected
    if _handler_calls:
        session.config.get_terminal_writer().line(_describe(_handler_calls), red=True)
        _handler_calls.clear()
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
