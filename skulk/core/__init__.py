"""Skulk's pure, deterministic, sans-I/O core.

Every component here is a state machine shaped like ``handle(now, input) ->
list[Effect]``: time comes in as an argument, randomness from a seeded
generator the driver owns, and effects go out as plain data. Both the asyncio
runtime (``skulk.runtime``) and the simulator (``sim``) drive this code; neither
contains protocol logic of its own.

Nothing under this package may import asyncio, threading, socket, time, os,
random, zenoh, mlx, starlette or uvicorn (an import-linter contract enforces it).
"""
