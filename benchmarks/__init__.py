"""The benchmark harness of issue 5: ``make bench`` runs ``python -m benchmarks.run``."""
