"""Local stand-ins for external services (part of the product: local runs, tests, benchmarks)."""
