"""Which cluster an aux node belongs to: the first one that drives it, recorded in its data dir.

A master sends ``BIND cluster_id`` on every connection it opens to an aux
node, before any other cluster op (docs/PROTOCOL.md "BIND"). The node that
belongs to no cluster yet takes the first id it is given and writes it to
``DATA_DIR/cluster``; from then on it answers that id to the same cluster
and ``WRONG_CLUSTER`` to any other, so a master of an unrelated cluster
(seeded with this node by mistake, or joined by it) never moves, drops or
routes its keys: two clusters driving one node drop each other's keys after
their migrations, and their epochs mean nothing to each other.

The file survives restarts, so a restarted node serves its own cluster
again and still refuses the other. A node without a data dir keeps the id in
memory (it comes back empty anyway). An operator who moves a node to another
cluster on purpose deletes the file while the node is stopped
(docs/OPERATIONS.md).
"""

from __future__ import annotations

import logging
import os
import time

from ..errors import ConfigError, WrongClusterError
from ..files import open_private

__all__ = ["CLUSTER_FILE", "ClusterBinding"]

log = logging.getLogger("dcache.aux.binding")

#: The file in the data dir that holds the cluster id.
CLUSTER_FILE = "cluster"
#: A refusal of the same cluster is logged at most this often.
_REFUSAL_LOG_EVERY_S = 30.0
_MAX_ID_BYTES = 1024


class ClusterBinding:
    """The cluster id an aux node is bound to, and the file that keeps it."""

    __slots__ = ("path", "cluster_id", "refusals", "_logged")

    def __init__(self, data_dir: str | None) -> None:
        """``data_dir``: where the id is kept (``None``: in memory only)."""
        self.path = os.path.join(data_dir, CLUSTER_FILE) if data_dir is not None else None
        #: The cluster this node belongs to (``None``: none drove it yet).
        self.cluster_id: str | None = None
        #: BINDs refused since start.
        self.refusals = 0
        self._logged: dict[str, float] = {}

    def load(self) -> None:
        """Read the recorded id (call after the data dir is prepared and locked).

        Raises:
            ConfigError: the file exists but cannot be read or is not an id.
        """
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                raw = f.read(_MAX_ID_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode().strip()
        except UnicodeDecodeError:
            text = ""
        if not text or len(raw) > _MAX_ID_BYTES or "\n" in text:
            raise ConfigError(
                f"data_dir: {self.path} does not hold a cluster id; delete it to let the next cluster that drives this node take it"
            )
        self.cluster_id = text
        log.info("this node belongs to cluster %r (%s)", text, self.path)

    def bind(self, cluster_id: str) -> str:
        """Answer BIND: take ``cluster_id`` if none is recorded; return the recorded id.

        Raises:
            WrongClusterError: another cluster's id is recorded.
        """
        current = self.cluster_id
        if current is None:
            self._save(cluster_id)
            self.cluster_id = cluster_id
            log.info("this node now belongs to cluster %r", cluster_id)
            return cluster_id
        if current == cluster_id:
            return current
        self.refusals += 1
        where = f" (recorded in {self.path})" if self.path is not None else ""
        message = (
            f"this aux node belongs to cluster {current!r}{where} and refuses cluster {cluster_id!r}: "
            "a node serves one cluster (seed or join it to one only)"
        )
        now = time.monotonic()
        if now - self._logged.get(cluster_id, -_REFUSAL_LOG_EVERY_S) >= _REFUSAL_LOG_EVERY_S:
            self._logged[cluster_id] = now
            log.warning("%s", message)
        raise WrongClusterError(message)

    def _save(self, cluster_id: str) -> None:
        """Write the id (temp file, fsync, rename): a crash leaves the old file or the new one, never half of one.

        A file that cannot be written is logged: the node stays bound in memory until it restarts.
        """
        if self.path is None:
            return
        tmp = f"{self.path}.tmp.{os.getpid()}"
        try:
            with open_private(tmp) as f:
                f.write(cluster_id.encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("cannot record cluster %r in %s (%s): bound until this process stops", cluster_id, self.path, exc)
