"""Fast BLAS for MLX's CPU matmuls on Linux: probe what mlx binds to, then route it.

Theory of operation
-------------------
The Linux ``mlx[cpu]`` wheel takes ``cblas_sgemm`` (and the d/c variants) from
a bundled reference BLAS that runs an f32 matmul at a few GFLOP/s. Called
before ``import mlx.core``, ``enable_fast_blas`` puts a tiny forwarding shim
in the process's global symbol scope so mlx binds to an optimized OpenBLAS
shipped by a PyPI wheel instead, and proves by a call counter and a numeric
self-check that it did. See ``docs/engine-blas.md``.

Modules, each opening with its own theory of operation:

- ``route``: ``enable_fast_blas`` (find, load, bind, check, promote);
- ``elf``: a ``struct``-only ELF reader (what libmlx.so imports, and from where);
- ``check``: the numeric self-checks against numpy (direct and through mlx);
- ``shim.c``: the forwarding shim, compiled once into the data dir's cache;
- ``probe``: ``python -m skulk.engine.accel.probe '<json>'``, one fresh
  process that enables fast BLAS (per ``SKULK_FAST_BLAS``) and measures it,
  for the BLAS benchmark (``python -m skulk.bench blas``) and the tests.

Invariant: importing this package imports no MLX and changes nothing; only
``enable_fast_blas()`` does, and it never raises.
"""

from skulk.engine.accel.route import OPT_OUT_ENV, BlasStatus, enable_fast_blas, fast_blas_calls, shim_cache_dir

__all__ = ["OPT_OUT_ENV", "BlasStatus", "enable_fast_blas", "fast_blas_calls", "shim_cache_dir"]
