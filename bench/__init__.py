"""The benchmark harness (``python -m bench``). Not part of the pgqueue wheel; see docs/benchmarks.md."""
