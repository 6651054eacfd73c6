"""Benchmarks (issues 2 and 3): see bench/README.md."""
