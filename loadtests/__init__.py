"""Reliability on real processes (issue 8): load, storms, failover, bad inputs, sim-to-real parity.

- ``locustfile``: Locust users against the real HTTP API (streamed and plain
  chat, state polling, abandoning clients), each request also a JSON record;
- ``run``: Locust headless as a subprocess, bounded by time and requests;
- ``records``: figures from the per-request records;
- ``cluster``: real node processes (loopback), their state and disk logs;
- ``capacity``, ``storm``, ``failover``, ``fuzz``: the runs;
- ``recorder`` + ``chaos.realtrace``: a real run as a trace the chaos
  checkers judge; ``parity``: beside the simulated scenarios;
- ``report``: ``python -m loadtests.report`` writes ``docs/reliability.md``.
"""
