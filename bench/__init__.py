"""Side-by-side benchmarks (`python -m deem.bench` / `deem bench`): ratios against stock library paths."""
