"""The tools of the ``dcache`` command that are clients of a cluster, or start one.

* ``loadgen``: ``dcache bench``, a closed-loop load generator (``BenchOptions``, ``run_bench``);
* ``cluster``: ``dcache cluster``, a whole local cluster in one command (``ClusterOptions``, ``run_cluster``);
* ``dump``: ``dcache dump`` and ``dcache restore`` (``dump_cluster``, ``restore_cluster``).

They take plain arguments or a small options dataclass; their flags are
declared in ``dcache.cli``, the one module that reads argv.
"""
