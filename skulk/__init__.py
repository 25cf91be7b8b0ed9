"""Skulk: several machines, one LLM inference cluster."""

__version__ = "0.2.0"
