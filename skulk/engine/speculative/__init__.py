"""Speculative decoding for the runner: drafters, bonus-driven rounds, rank lockstep.

See ``docs/speculative-decoding.md``. Public surface:

- ``engine``: ``SpeculativeEngine`` (rank 0), ``spec_follow`` (other ranks),
  ``build_speculator`` (load-time set-up, a collective across ranks);
- ``drafters``: ``DraftModelDrafter`` and ``MtpDrafter``;
- ``acceptance``: greedy and sampled (rejection-sampling) acceptance;
- ``rounds``: one round, and a single-stream decoder (used by the tests);
- ``mtp``: MTP heads, loaded from Qwen3-Next or DeepSeek-V3 layouts;
- ``models``: generated target/draft pairs with MTP heads.

Its benchmark and depth tuner are tools, ``python -m skulk.bench speculative``
and ``python -m skulk.bench tune`` (``skulk.bench``).

Importing this package imports no MLX; its modules do.
"""
