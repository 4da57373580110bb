"""The aux role (``dcache aux``): the data node. Named ``auxnode`` because AUX is a reserved file name on Windows."""

from .node import AuxNode, run_aux, serve_aux

__all__ = ["AuxNode", "run_aux", "serve_aux"]
