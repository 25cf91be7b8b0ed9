"""Skulk's measuring tools: benchmarks and tuners, kept apart from the engine they measure.

One front door, ``python -m skulk.bench <tool> [flags]`` (``--help`` after a
tool lists its flags); each tool is also ``python -m skulk.bench.<module>``:

- ``engine`` (``engine.py``): the runner against mlx-lm and ``mlx_lm.server``:
  prefill, decode, concurrent streams, the BLAS, peak memory; a registry of
  sections (``engine.SECTIONS``) that new benchmarks join;
- ``blas`` (``blas.py``): MLX on its bundled reference BLAS vs Skulk's fast
  BLAS (``skulk.engine.accel``), side by side in two processes;
- ``speculative`` (``speculative.py``): speculative decoding on the generated
  high-agreement pair: costs, acceptance, measured vs predicted speed-ups;
- ``tune`` (``tune.py``): the best speculation depth for a model on this
  machine, optionally written to its card.

``spec_measure`` holds the speculation measurements ``speculative`` and
``tune`` share. Every tool prints figures measured side by side in one run
and asserts none of them.

The engine never imports this package (an import-linter contract); importing
it imports no MLX, and neither does choosing a tool: each tool enables fast
BLAS itself before it imports ``mlx.core``.
"""
