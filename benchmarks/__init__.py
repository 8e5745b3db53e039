"""Research tools beside the package: benchmarks and the results table. Run from the repository root."""
