"""Shared test helpers: real node processes on loopback, network namespaces."""
