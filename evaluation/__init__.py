"""The paper's benchmarks with their protocols (`deem evaluate`), metrics from kept libraries, the lmms-eval plugin."""
