"""Benchmarks: ``python -m bench.run`` (the gateway against the fake upstream) and
``python -m bench.engines`` (upstream client engines in a minimal relay).

Not tests: they report figures and ratios against a baseline measured in the same run,
and append them to bench/RESULTS.md. Loopback only; everything they start they stop.
"""
