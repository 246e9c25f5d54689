"""Benchmarks: speed is measured here, never asserted in unit tests (see README and STYLE.md)."""
