"""The fault campaign script (bin/chaos.py): its planner's rules, and one short real schedule.

The campaign itself is long (docs/OPERATIONS.md, "Fault campaign"); here
the planner is checked over many seeds, and one schedule runs end to end
against real processes, bounded in time.
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Bound on the one-schedule run (a cluster start, a fault, settling, verifying; generous on 2 shared cores).
RUN_TIMEOUT_S = 240.0


def load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "bin" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("zookeeper", [False, True])
def test_plans_keep_the_campaigns_rules(zookeeper: bool) -> None:
    chaos = load_chaos()
    kinds = set()
    for seed in range(300):
        rng = random.Random(seed)
        members = frozenset(chaos.FIRST_MEMBERS) | ({"a4"} if seed % 2 else set())
        faults = chaos.plan(rng, members, zookeeper)
        assert 1 <= len(faults) <= 2
        assert len({f.target for f in faults}) == len(faults), "two faults on one target"
        assert sum(f.kind in chaos.OUT_KINDS for f in faults) <= 1, "two aux nodes out at once"
        assert sum(f.kind in chaos.MASTER_KINDS for f in faults) <= 1, "two master faults (leader may be either master)"
        size = len(members) + sum(f.kind == "aux-join" for f in faults) - sum(f.kind == "aux-leave" for f in faults)
        assert chaos.MIN_MEMBERS <= size <= len(chaos.AUX_NODES)
        for f in faults:
            assert chaos.Fault.parse(str(f), zookeeper) == f
            kinds.add(f.kind)
    expected = set(chaos.HOLD_S) if zookeeper else set(chaos.HOLD_S) - set(chaos.ZK_KINDS)
    assert kinds == expected, "every kind of the mode is drawn"
    assert chaos.plan(random.Random(7), frozenset(chaos.FIRST_MEMBERS)) == chaos.plan(random.Random(7), frozenset(chaos.FIRST_MEMBERS))
    with pytest.raises(ValueError):
        chaos.parse_schedule("master-kill,a1,0,1", zookeeper)
    with pytest.raises(ValueError):
        chaos.parse_schedule("zk-kill,zk,0,1")  # a ZooKeeper fault outside --zookeeper
    assert chaos.parse_schedule("master-stop,leader,0,3;zk-stop,zk,1,2", zookeeper=True)[0].target == "leader"
    assert chaos.parse_schedule("master-stop,m2,0,3")[0].kind == "master-stop"  # embedded mode pauses masters too
    with pytest.raises(ValueError):
        chaos.parse_schedule("master-stop,leader,0,3")  # no leader outside --zookeeper


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_one_schedule_runs_end_to_end(tmp_path: Path) -> None:
    """A fast aux restart under load: the script starts, injects, heals, verifies, stops by itself and says ok."""
    cmd = [sys.executable, str(ROOT / "bin" / "chaos.py"), "--seeds", "1", "--schedule", "aux-kill-fast,a2,0,0.3"]
    cmd += ["--max-seconds", "60", "--log-dir", str(tmp_path / "logs")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT)
    print(res.stdout[-5000:], res.stderr[-5000:])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "seed 1 schedule 0 [aux-kill-fast,a2,0.00,0.30] ok: stale 0 resurrected 0 wrong 0 lost 0" in res.stdout
    assert "campaign: 1 schedules" in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_one_zookeeper_schedule_runs_end_to_end(tmp_path: Path) -> None:
    """ZooKeeper mode: its own ZooKeeper, stopped for a moment under load and a master fault on the leader; heals, verifies, says ok."""
    pytest.importorskip("kazoo")
    from tests.zookeeper import find_zookeeper

    find_zookeeper()  # skipped (or failed under CI) without ZooKeeper, as the ZooKeeper tests are
    schedule = "zk-stop,zk,0,1;master-kill,leader,0.5,0.5"
    cmd = [sys.executable, str(ROOT / "bin" / "chaos.py"), "--zookeeper", "--seeds", "1", "--schedule", schedule]
    cmd += ["--max-seconds", "60", "--log-dir", str(tmp_path / "logs")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT)
    print(res.stdout[-5000:], res.stderr[-5000:])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "seed 1 schedule 0 [zk-stop,zk,0.00,1.00;master-kill,leader,0.50,0.50] ok: stale 0 resurrected 0 wrong 0 lost 0" in res.stdout
    assert "master-kill: the leader was m" in res.stdout
