"""The learning benchmark's scenarios (`benchmarks/bench_learning.py` is the entry point): shared
helpers in `common`, then one module per scenario: `continual`, `drift`, `routing`."""
