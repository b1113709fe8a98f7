"""Benchmarks of the mesh against bare gRPC: ``python -m benchmarks`` (``make bench``).

Servers run in their own processes (``benchmarks.serve``, ``benchmarks.echo``), the
load comes from another (``benchmarks.loadgen``), and the orchestrator
(``benchmarks.run``) interleaves the cases, repeats them, and writes
``benchmarks/results/latest.md`` and ``latest.json``.
"""
