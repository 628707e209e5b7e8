"""Benchmarks shared with the repository's bench/ suite: the case matrix and `ftcore bench-diff`."""
