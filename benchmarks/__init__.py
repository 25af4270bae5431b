"""Benchmarks of gem_kernels against cross-entropy kernels: ``python -m benchmarks --help``.

Modules: shapes (what is run), providers (the loss implementations compared and what each row
includes), runner (memory / time / traffic / FLOPs of one provider at one shape in one table),
roofline (logical bytes of the Triton providers, copy bandwidth and matmul rate measured in the
run, derived columns), report (tables, CSV, plots), traffic (Triton global-memory traffic under the
interpreter), ncu (opt-in Nsight Compute DRAM bytes), measure (peak memory and FLOP counting).
fused_memory, torch_path, compile_vs_eager, core_figures, design_traffic and metrics_cost are
focused measurements quoted in the README, on the same providers and input factory (runner).
Importing this package imports neither torch nor triton, so ``__main__`` can switch the Triton
interpreter on first.
"""
