"""Benchmarks of the mesh against plain gRPC: ``python -m benchmarks`` (``make bench``).

Servers run in their own processes (``mesh`` services through ``benchmarks.serve``, the
raw-bytes relay ``benchmarks.proxy``, a ``redis-server``), the load comes from another
(``benchmarks.loadgen``), and the orchestrator (``benchmarks.run``) interleaves the
cases, repeats them, and writes ``benchmarks/results/latest.md`` and ``latest.json``,
``docs/benchmarks.md`` and the README's table.
"""
