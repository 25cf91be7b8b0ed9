"""The MLX inference engine: runner processes, generation, batching, ranks.

Importing this package imports nothing heavy; ``protocol``, ``client`` and
``models`` are MLX-free and safe for the node and the API. Fast BLAS lives in
``accel``; the benchmarks and tuners that measure the engine are tools in
``skulk.bench``. See docs/engine.md.
"""
