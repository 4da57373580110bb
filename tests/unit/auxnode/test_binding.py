"""An aux node's cluster binding: the first cluster that BINDs it, kept in its data dir."""

from __future__ import annotations

import pytest

from dcache.auxnode.binding import CLUSTER_FILE, ClusterBinding
from dcache.errors import ConfigError, WrongClusterError


def test_the_first_cluster_binds_and_another_is_refused(tmp_path):
    b = ClusterBinding(str(tmp_path))
    b.load()
    assert b.cluster_id is None
    assert b.bind("dcache/m1") == "dcache/m1"
    assert b.bind("dcache/m1") == "dcache/m1"
    with pytest.raises(WrongClusterError, match=r"belongs to cluster 'dcache/m1'.*refuses cluster 'dcache/other'"):
        b.bind("dcache/other")
    assert b.refusals == 1 and (tmp_path / CLUSTER_FILE).read_text() == "dcache/m1\n"


def test_a_restarted_node_keeps_its_cluster(tmp_path):
    ClusterBinding(str(tmp_path)).bind("zk:prod")
    again = ClusterBinding(str(tmp_path))
    again.load()
    assert again.cluster_id == "zk:prod"
    with pytest.raises(WrongClusterError):
        again.bind("dcache/m1")


def test_without_a_data_dir_the_binding_lives_in_memory():
    b = ClusterBinding(None)
    b.load()
    assert b.bind("a/b") == "a/b"
    with pytest.raises(WrongClusterError):
        b.bind("c/d")


def test_a_file_that_holds_no_id_stops_the_start(tmp_path):
    (tmp_path / CLUSTER_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="does not hold a cluster id"):
        ClusterBinding(str(tmp_path)).load()
