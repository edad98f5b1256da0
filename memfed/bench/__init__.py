"""Benchmarks: ``memfed bench NAME --json``. Each bench compares memfed to a named baseline in one run."""
