"""Short fuzz runs of every listener (the engine and the long run: tests/faults/fuzz.py, ``make fuzz``).

Each test fails on a crash, a hang, an INTERNAL answer (status 11 or HTTP
500), a protocol violation, a wrong answer to the steady client, or RSS
growth above a generous bound (overall, and per connection opened and
closed); the report printed shows the figures and each problem with the
request that caused it. The seed is fixed (``FUZZ_SEED`` changes it).
"""

from __future__ import annotations

import os

import pytest

from tests.faults.fuzz import run_target

pytestmark = pytest.mark.slow

#: Seconds of fuzzing per listener in the normal suite.
SHORT_S = float(os.environ.get("FUZZ_SHORT_SECONDS", "10"))
SEED = int(os.environ.get("FUZZ_SEED", "1"))
#: Overall RSS growth allowed in a short run (the fuzzer stores bounded data: tens of MiB).
RSS_BOUND_KIB = 128 * 1024


@pytest.mark.parametrize("target", ["aux", "master", "http"])
async def test_fuzz_listener(target: str):
    report = await run_target(target, SHORT_S, SEED)
    print(report.summary())
    problems = report.failures(RSS_BOUND_KIB)
    assert sum(report.cases.values()) > 0 and report.steady_ops > 0, "the fuzzer or the steady client did nothing"
    assert not problems, f"fuzz {target}: " + "; ".join(problems) + "\n" + report.summary()
