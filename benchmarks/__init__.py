"""Performance harness of iresflow: ``python -m benchmarks.run`` (see benchmarks/README.md)."""
