"""Benchmarks of whole models: ``vigla bench`` (see docs/bench.md).

* :mod:`~vigla.bench.flops`: MACs / FLOPs by shape (FlopCounterMode under FakeTensorMode).
* :mod:`~vigla.bench.measure`: timing (CUDA events / perf_counter), peak memory, OOM handling.
* :mod:`~vigla.bench.report`: environment record, ratios to a baseline, table, JSON, CSV.
* :mod:`~vigla.bench.plot`: the resolution figure.
* :mod:`~vigla.bench.cli`: the command.
"""
from .flops import count_flops, count_model_flops

__all__ = ["count_flops", "count_model_flops"]
