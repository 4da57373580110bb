"""The master role (``dcache master``): routing, membership, health, migration."""

from .node import MasterNode, run_master, serve_master
from .view import ClusterView, Member

__all__ = ["ClusterView", "MasterNode", "Member", "run_master", "serve_master"]
