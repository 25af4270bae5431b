"""Benchmarks of gem_kernels against cross-entropy kernels: ``python -m benchmarks --help``.

Modules: shapes (what is run), providers (the loss implementations compared and what each row
includes), runner (memory / time / traffic / FLOPs of one provider at one shape), report (tables,
CSV, plots), traffic (Triton global-memory traffic under the interpreter), measure (peak memory
and FLOP counting). Importing this package imports neither torch nor triton, so ``__main__`` can
switch the Triton interpreter on first.
"""
