"""fedlora benchmarks: one entry point (``python -m benchmarks <suite>|all``), one module per suite."""
