"""Benchmark suite: the fused kernels against eager PyTorch, torch.compile and Liger-Kernel.

``python -m logitstd_kernels bench`` (see ``cli.py``) times every provider on the present device,
after checking each against the float64 reference, and writes a table, CSV, JSON and a plot to
``--out`` (default ``./logitstd_results/bench``; ``benchmarks/results/`` holds the committed runs). ``providers.py`` says what is timed, ``cases.py`` which shapes,
``measure.py`` how, ``report.py`` where the numbers go.
"""
