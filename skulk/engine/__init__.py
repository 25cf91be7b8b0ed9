"""The MLX inference engine: runner processes, generation, batching, ranks.

Importing this package imports nothing heavy; ``protocol`` and ``models`` are
MLX-free and safe for the node and the API. See docs/engine.md.
"""
