"""Security, issue 14: two credentials, consistency of the cluster's security, protected mode, brute force.

Real daemons on loopback. The cluster secret comes from a 0600 file; a
client token from ``--auth-token``. Every cluster op of ``dcache.protocol``'s
table (the ops whose credential is ``CLUSTER``) is sent, with arguments that
would do harm, on an anonymous connection and on a connection that presented
the client token, to every daemon that serves it; each must be refused with
AUTH_FAILED and change nothing. A connection that proves the secret is the
control: the same ops work for it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dcache.client import open_connection
from dcache.errors import AuthError, Status
from dcache.hlc import wall_ms
from dcache.protocol import OPS, PROTOCOL_VERSION, Credential, Op
from tests.cluster import FAST_HEALTH, Cluster, settled, wait_ring
from tests.harness import DaemonProcess, start_http, wait_for
from tests.rawconn import RawConn
from tests.wire import call, split_addr, wait_connected

pytestmark = pytest.mark.slow

SECRET = "the-cluster-secret-for-tests-0123"
TOKEN = "client-token-for-tests"
OK = 0
AUTH_FAILED = int(Status.AUTH_FAILED)

#: Every op that needs the cluster credential, from the table itself.
CLUSTER_OPS = sorted(op for op, spec in OPS.items() if spec.credential == Credential.CLUSTER)


def secret_file(tmp: Path, secret: str = SECRET, name: str = "cluster.secret") -> str:
    path = tmp / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)


def harmful_args(op: int) -> list[Any]:
    """Arguments that would hurt if the op ran: wipe, overwrite with a far version, take the ring."""
    far = (wall_ms() + 1000) << 22
    full = [[0, 0]]  # the whole hash space
    table: dict[Op, list[Any]] = {
        Op.GETV: [b"k0"],
        Op.MGETV: [[b"k0", b"k1"]],
        Op.SETV: [b"k0", b"evil", 0, 0, far],
        Op.DELV: [b"k0", far],
        Op.INCRV: [b"n", 1, far],
        Op.APPLY: [[[b"k0", b"evil", 0, far]]],
        Op.APPLY_DELETES: [[[b"k0", far]]],
        Op.SCAN: [full, 0, 100, 0],
        Op.DROP: [full, 0],
        Op.RANGE_COUNT: [full],
        Op.MSETV: [[[b"k0", b"evil", 0, 0, far]]],
        Op.INVACK: [2**40],
        Op.BIND: ["evil/cluster"],
        Op.EPOCH: [2**64 - 1, 2**64 - 1],  # a floor above every master's ring: every master refused for good
        Op.JOIN: ["evil", "127.0.0.1", 9, 100.0],
        Op.LEAVE: ["a1"],
        Op.FORGET: ["a1", True],
        Op.SYNC: ["evil-follower", 0, 0],
        Op.FENCE: ["a1", 0, "evil"],
    }
    return table[Op(op)]


def refused(addr: str, op: int, *, token: str | None) -> tuple[int, str]:
    """Send ``op`` with harmful arguments on a new connection (after HELLO with ``token`` if given); return (status, message)."""
    conn = RawConn(*split_addr(addr))
    try:
        if token is not None:
            _, status, info = conn.call(Op.HELLO, 1, PROTOCOL_VERSION, token, "test-client")
            assert status == OK, info
            assert isinstance(info.get("nonce"), bytes), "a node with a cluster secret offers a nonce"
        _, status, result = conn.call(op, 2, *harmful_args(op))
        return status, str(result)
    finally:
        conn.close()


def assert_all_refused(addr: str, role: str) -> None:
    failures = []
    for op in CLUSTER_OPS:
        if op not in served_by(role):
            continue
        for token in (None, TOKEN):
            status, message = refused(addr, op, token=token)
            who = "anonymous" if token is None else "client token"
            if status != AUTH_FAILED:
                failures.append(f"{Op(op).name} ({who}) on {role}: status {status}, {message}")
    assert not failures, "\n".join(failures)


def served_by(role: str) -> set[Op]:
    aux = {
        Op.GETV,
        Op.MGETV,
        Op.SETV,
        Op.DELV,
        Op.INCRV,
        Op.APPLY,
        Op.APPLY_DELETES,
        Op.SCAN,
        Op.DROP,
        Op.RANGE_COUNT,
        Op.MSETV,
        Op.INVACK,
        Op.BIND,
        Op.EPOCH,
    }
    master = {Op.APPLY, Op.JOIN, Op.LEAVE, Op.FORGET, Op.SYNC, Op.FENCE}
    return aux if role == "aux" else master


def test_the_served_cluster_ops_cover_the_table() -> None:
    """The sets above cover every cluster op of the table: a new cluster op must be added to this test."""
    assert {int(op) for op in served_by("aux") | served_by("master")} == set(CLUSTER_OPS)


async def _value(addr: str, key: bytes) -> Any:
    from dcache import Client

    async with Client(addr, auth_token=TOKEN, timeout=5.0) as c:
        return await c.get(key)


def test_every_cluster_op_is_refused_without_the_secret_on_every_daemon(tmp_path: Path) -> None:
    sec = secret_file(tmp_path)
    creds = ("--cluster-secret-file", sec, "--auth-token", TOKEN)
    cl = Cluster(tmp_path)
    try:
        m1 = cl.start_master("m1", *creds)
        m2 = cl.start_master("m2", *creds, follow=m1)
        a1 = cl.start_aux("a1", *creds)
        a2 = cl.start_aux("a2", *creds)
        info = asyncio.run(
            wait_ring(m1.addr, settled({"a1", "a2"}), auth_token=TOKEN)  # up, and the master's links open
        )
        assert all(n["auth_error"] is None for n in info["nodes"])

        async def write() -> None:
            from dcache import Client

            async with Client(m1.addr, auth_token=TOKEN, timeout=5.0) as c:
                for i in range(50):
                    await c.set(f"k{i}", b"good")

        asyncio.run(write())
        before = asyncio.run(wait_ring(m1.addr, lambda i: True, auth_token=TOKEN))

        for proc, role in ((a1, "aux"), (a2, "aux"), (m1, "master"), (m2, "master")):
            assert_all_refused(proc.addr, role)

        # Nothing changed: the keys, their values and the ring are as they were.
        assert [asyncio.run(_value(m1.addr, f"k{i}".encode())) for i in range(50)] == [b"good"] * 50
        after = asyncio.run(wait_ring(m1.addr, lambda i: True, auth_token=TOKEN))
        assert after["ring"] == before["ring"] and {n["node_id"] for n in after["nodes"]} == {"a1", "a2"}
        assert after["epoch"] == before["epoch"]

        # Control: proving the secret grants the same ops.
        async def proven() -> None:
            host, port = split_addr(a1.addr)
            conn = await open_connection(host, port, auth_token=TOKEN, cluster_secret=SECRET.encode())
            try:
                assert await conn.call(Op.RANGE_COUNT, [[0, 0]]) > 0
                _cursor, entries, _tombstones = await conn.call(Op.SCAN, [[0, 0]], 0, 100, 0)
                assert entries and all(e[1] == b"good" for e in entries)
            finally:
                conn.close()
            # The secret does not replace the token: AUTH comes after a successful HELLO.
            with pytest.raises(AuthError):
                await open_connection(host, port, cluster_secret=SECRET.encode())
            # A wrong secret is refused.
            with pytest.raises(AuthError):
                await open_connection(host, port, auth_token=TOKEN, cluster_secret=b"not-the-cluster-secret-0000")

        asyncio.run(proven())
    except BaseException:
        print(cl.logs())
        raise
    finally:
        cl.stop()


def test_a_secret_without_a_token_still_guards_cluster_ops(tmp_path: Path) -> None:
    """Only a cluster secret: anonymous connections get the data ops, never a cluster op."""
    aux = DaemonProcess(
        "aux", ["--host", "127.0.0.1", "--port", "0", "--node-id", "a1", "--cluster-secret-file", secret_file(tmp_path)]
    ).start()
    try:
        assert call(aux.addr, Op.SET, 1, b"k", b"v")[1] == OK
        for op in served_by("aux"):
            status, message = refused(aux.addr, op, token=None)
            assert status == AUTH_FAILED, f"{Op(op).name}: {status} {message}"
            assert "cluster op" in message
        assert call(aux.addr, Op.GET, 1, b"k") == (1, OK, b"v")
    finally:
        aux.kill()


def test_an_aux_node_without_the_secret_cannot_join_and_is_not_routed_to(tmp_path: Path) -> None:
    sec = secret_file(tmp_path)
    wrong = secret_file(tmp_path, "a-different-secret-0000000", "wrong.secret")
    cl = Cluster(tmp_path)
    try:
        m1 = cl.start_master("m1", "--cluster-secret-file", sec)
        cl.start_aux("good", "--cluster-secret-file", sec)
        none = cl.start_aux("none")  # no secret: its JOIN is a cluster op it cannot get
        bad = cl.start_aux("bad", "--cluster-secret-file", wrong)
        asyncio.run(wait_ring(m1.addr, lambda i: {n["node_id"] for n in i["nodes"]} == {"good"}))
        wait_for(lambda: "WARNING" in none.stderr() and "refused this node's credentials" in none.stderr(), 10, message="none's WARNING")
        wait_for(lambda: "WARNING" in bad.stderr() and "refused this node's credentials" in bad.stderr(), 10, message="bad's WARNING")
        # Rate-limited: one line per reason, not one per retry (it retries every 0.5 s; watch for 2 s).
        time.sleep(2.0)
        assert none.stderr().count("refused this node's credentials") == 1, none.stderr()
        info = asyncio.run(wait_ring(m1.addr, lambda i: True))
        assert {n["node_id"] for n in info["nodes"]} == {"good"}
    except BaseException:
        print(cl.logs())
        raise
    finally:
        cl.stop()


def test_a_master_with_the_secret_does_not_route_to_a_seeded_aux_node_without_it(tmp_path: Path) -> None:
    sec = secret_file(tmp_path)
    good = DaemonProcess(
        "aux", ["--host", "127.0.0.1", "--port", "0", "--node-id", "good", "--cluster-secret-file", sec, "--data-dir", str(tmp_path / "g")]
    ).start()
    open_aux = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--node-id", "open", "--data-dir", str(tmp_path / "o")]).start()
    master = DaemonProcess(
        "master",
        [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--aux",
            f"good={good.addr},open={open_aux.addr}",
            "--cluster-secret-file",
            sec,
            *FAST_HEALTH,
        ],
    ).start()
    try:
        info = asyncio.run(
            wait_ring(
                master.addr,
                lambda i: any(n["node_id"] == "open" and n["auth_error"] and n["state"] == "down" for n in i["nodes"]),
                what="the open node refused and down",
            )
        )
        node = next(n for n in info["nodes"] if n["node_id"] == "open")
        assert "no cluster secret" in node["auth_error"] and not node["connected"]
        wait_for(lambda: "not routing to aux open" in master.stderr(), 5, message="the master's WARNING")
        assert "WARNING" in next(line for line in master.stderr().splitlines() if "not routing to aux open" in line)

        async def write() -> int:
            from dcache import Client

            async with Client(master.addr, timeout=5.0) as c:
                written = 0
                for i in range(200):
                    try:
                        await c.set(f"k{i}", b"v")
                        written += 1
                    except Exception:
                        pass
                return written

        written = asyncio.run(write())
        assert written > 0
        # The open node got nothing: every key went to the node that proved the secret (or failed).
        _, status, stats = call(open_aux.addr, Op.STATS, 1)
        assert status == OK and stats["items"] == 0
        _, status, stats = call(good.addr, Op.STATS, 1)
        assert stats["items"] == written
        # dcache ring says so too.
        out = subprocess.run(
            [sys.executable, "-m", "dcache", "ring", "--addr", master.addr], capture_output=True, text=True, timeout=30
        ).stdout
        assert "no cluster secret" in out, out
    finally:
        for p in (master, good, open_aux):
            p.kill()


def test_brute_force_is_closed_after_three_tries_and_throttled_per_address(tmp_path: Path) -> None:
    aux = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--auth-token", TOKEN, "--log-level", "info"]).start()
    try:
        # One connection: three wrong tokens, then it is closed.
        conn = RawConn(*split_addr(aux.addr))
        for i in range(3):
            _, status, _ = conn.call(Op.HELLO, i + 1, PROTOCOL_VERSION, f"guess-{i}")
            assert status == AUTH_FAILED
        assert conn.closed_by_server()
        conn.close()

        # Many connections from the same address for 3 s: checks are throttled to about one per second.
        tried = failed = throttled = 0
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            conn = RawConn(*split_addr(aux.addr))
            try:
                _, status, message = conn.call(Op.HELLO, 1, PROTOCOL_VERSION, "guess")
            except EOFError:
                continue
            finally:
                conn.close()
            tried += 1
            assert status == AUTH_FAILED
            if "too many failed attempts" in str(message):
                throttled += 1
            else:
                failed += 1
        elapsed = time.monotonic() - start
        # 5 failures per address, then at most one real check per second.
        assert failed <= 2 + elapsed + 2, (failed, throttled, elapsed)
        assert throttled > 10
        print(f"brute force: {tried} attempts in {elapsed:.1f} s, {failed} tokens checked, {throttled} throttled")
        # Counted in STATS (and metrics), logged rate-limited with the address.
        wait_for(lambda: "authentication failed from 127.0.0.1" in aux.stderr(), 5)
        assert aux.stderr().count("authentication failed from") <= 2

        async def stats() -> dict[str, Any]:
            host, port = split_addr(aux.addr)
            c = await open_connection(host, port, auth_token=TOKEN)
            try:
                return await c.call(Op.STATS)  # type: ignore[no-any-return]
            finally:
                c.close()

        # The right token is still checked, at one per second: retry until the next slot.
        deadline = time.monotonic() + 5
        while True:
            try:
                s = asyncio.run(stats())
                break
            except AuthError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert s["auth_failures"] >= failed and s["auth_throttled"] >= throttled
    finally:
        aux.kill()


@pytest.mark.parametrize("role", ["aux", "master", "http"])
def test_protected_mode_refuses_a_public_address_without_credentials(role: str, tmp_path: Path) -> None:
    extra = ["--master", "127.0.0.1:9"] if role == "http" else []
    cmd = [sys.executable, "-m", "dcache", role, "--host", "0.0.0.0", "--port", "0", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "protected mode" in lines[0] and "--insecure" in lines[0]

    # --insecure overrides it, with a WARNING.
    p = DaemonProcess(role, ["--host", "0.0.0.0", "--port", "0", "--insecure", "true", *extra]).start()
    try:
        wait_for(lambda: "protected mode is off" in p.stderr(), 5)
        assert "WARNING" in next(line for line in p.stderr().splitlines() if "protected mode is off" in line)
    finally:
        p.kill()
    # A credential is enough.
    cred = ["--http-token", TOKEN] if role == "http" else ["--cluster-secret-file", secret_file(tmp_path)]
    p = DaemonProcess(role, ["--host", "0.0.0.0", "--port", "0", *cred, *extra]).start()
    p.kill()


def test_http_token_guards_the_shim(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    aux = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--node-id", "a1"]).start()
    master = DaemonProcess("master", ["--host", "127.0.0.1", "--port", "0", "--aux", f"a1={aux.addr}"]).start()
    shim = start_http(master.addr, extra=["--http-token", TOKEN])
    try:
        wait_connected(master.addr, {"a1"})
        base = f"http://{shim.addr}"

        def request(method: str, path: str, auth: str | None, body: bytes | None = None) -> int:
            req = urllib.request.Request(base + path, data=body, method=method)
            if auth is not None:
                req.add_header("Authorization", auth)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert request("PUT", "/data/k", None, b"v") == 401
        assert request("PUT", "/data/k", "Bearer wrong", b"v") == 401
        assert request("GET", "/data/k", None) == 401
        assert request("PUT", "/data/k", f"Bearer {TOKEN}", b"v") in (200, 201, 204)
        assert request("GET", "/data/k", f"Bearer {TOKEN}") == 200
        assert request("GET", "/health", None) == 200
        assert request("GET", "/metrics", None) == 200
    finally:
        for p in (shim, master, aux):
            p.kill()


def test_dump_and_restore_prove_the_secret(tmp_path: Path) -> None:
    sec = secret_file(tmp_path)
    cl = Cluster(tmp_path)
    try:
        m1 = cl.start_master("m1", "--cluster-secret-file", sec)
        cl.start_aux("a1", "--cluster-secret-file", sec)
        wait_connected(m1.addr, {"a1"})
        for i in range(20):
            assert call(m1.addr, Op.SET, 1, f"k{i}".encode(), b"v")[1] == OK
        out = tmp_path / "cluster.dump"

        def dcache(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "dcache", *args], capture_output=True, text=True, timeout=60)

        refused_dump = dcache("dump", "--addr", m1.addr, "--out", str(out))
        assert refused_dump.returncode != 0 and "cluster op" in refused_dump.stderr and not out.exists()
        assert "Traceback" not in refused_dump.stderr
        done = dcache("dump", "--addr", m1.addr, "--out", str(out), "--cluster-secret-file", sec)
        assert done.returncode == 0, done.stderr
        assert "keys: 20" in done.stdout

        assert call(m1.addr, Op.DELETE, 1, b"k0")[1] == OK
        refused_restore = dcache("restore", "--addr", m1.addr, "--in", str(out))
        assert refused_restore.returncode != 0 and "cluster op" in refused_restore.stderr
        done = dcache("restore", "--addr", m1.addr, "--in", str(out), "--cluster-secret-file", sec)
        assert done.returncode == 0, done.stderr
        # The delete is newer than the dumped k0: the restore keeps it deleted; nothing else changed.
        assert call(m1.addr, Op.GET, 1, b"k0")[2] is None
        assert call(m1.addr, Op.GET, 1, b"k1")[2] == b"v"
    except BaseException:
        print(cl.logs())
        raise
    finally:
        cl.stop()
