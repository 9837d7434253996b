"""fractal-kernels benchmark suite: harness, cases and the ``fractal-bench`` CLI."""
