"""Locust load test for the HTTP shim (``dcache http``, docs/HTTP.md).

Run it against a running shim (the host comes from ``--host``)::

    .venv/bin/locust -f bench/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8080
    .venv/bin/locust -f bench/locustfile.py --host http://127.0.0.1:8080     # web UI on :8089

Each simulated user writes its own keys (``locust:<user>:<n>``, 100-byte
values, as ``bench/wrk_post.lua`` does) and picks one task at a time, at
random by weight, with no wait between tasks:

=========  ======  ========================================================================
task       weight  request, and what counts as success
=========  ======  ========================================================================
post       10      ``POST /data`` JSON ``{"key", "value"}``: 201 echoing both
get_hit    10      ``GET /data/{key}`` of a key this user wrote: 200 with the value written
get_miss   3       ``GET /data/{key}`` of a key nobody writes: 404 ``{"error": "not found"}``
delete     2       ``DELETE /data/{key}`` of a key this user wrote: 200 ``"deleted": true``
=========  ======  ========================================================================

So 40% writes, 52% reads (77% of them hits) and 8% deletes. Every answer is checked, not only its status: a
hit that answers 404 is a failure (the aux nodes' memory budget must hold
what a run writes; ``dcache cluster`` gives each 256 MB). Requests are
reported under the names ``POST /data``, ``GET /data/{key} (hit)``,
``GET /data/{key} (miss)`` and ``DELETE /data/{key}``
(``tests/integration/test_locust.py`` runs this file for 5 s and checks each
name saw requests and none failed).
"""

from __future__ import annotations

import random
import uuid
from urllib.parse import quote

from locust import FastHttpUser, constant, task

VALUE = "x" * 100


class ShimUser(FastHttpUser):
    """One client of the shim with its own key space."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.prefix = f"locust:{uuid.uuid4().hex[:12]}:"
        self.next_id = 0
        self.written: list[str] = []

    def _new_key(self) -> str:
        self.next_id += 1
        return f"{self.prefix}{self.next_id}"

    @task(10)
    def post(self) -> None:
        key = self._new_key()
        with self.client.post("/data", json={"key": key, "value": VALUE}, name="POST /data", catch_response=True) as resp:
            if resp.status_code != 201:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
            elif resp.json() != {"key": key, "value": VALUE}:
                resp.failure(f"unexpected body {resp.text[:200]}")
            else:
                self.written.append(key)

    @task(10)
    def get_hit(self) -> None:
        if not self.written:
            self.post()
            return
        key = random.choice(self.written)
        with self.client.get(f"/data/{quote(key, safe='')}", name="GET /data/{key} (hit)", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code} for a key written earlier: {resp.text[:200]}")
            elif resp.json() != {"key": key, "value": VALUE}:
                resp.failure(f"unexpected body {resp.text[:200]}")

    @task(3)
    def get_miss(self) -> None:
        key = f"{self.prefix}never-{random.randrange(1 << 30)}"
        with self.client.get(f"/data/{quote(key, safe='')}", name="GET /data/{key} (miss)", catch_response=True) as resp:
            if resp.status_code != 404:
                resp.failure(f"expected 404 for a key never written, got {resp.status_code}: {resp.text[:200]}")
            elif resp.json() != {"error": "not found", "key": key}:
                resp.failure(f"unexpected body {resp.text[:200]}")
            else:
                resp.success()  # a 404 is this task's expected answer

    @task(2)
    def delete(self) -> None:
        if not self.written:
            self.post()
            return
        key = self.written.pop(random.randrange(len(self.written)))
        with self.client.delete(f"/data/{quote(key, safe='')}", name="DELETE /data/{key}", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
            elif resp.json() != {"key": key, "deleted": True}:
                resp.failure(f"unexpected body {resp.text[:200]}")
