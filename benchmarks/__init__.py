"""Benchmarks of ztnet (run with `make bench`); scripts, not a test suite."""
