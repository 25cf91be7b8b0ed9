"""The simulator: Skulk's real core nodes under simulated time, network, disks, runners and clients.

- ``sim.world``: one simpy environment per run; hosts, network, clients, faults.
- ``sim.options``: every knob of a run, drawn from the seed and printed in full.
- ``sim.host``, ``sim.network``, ``sim.runners``, ``sim.clients``, ``sim.faults``: the models.
- ``sim.trace``: the trace of a run and its digest (determinism).
- ``sim.manual``: a hand-stepped cluster for unit and Hypothesis tests.

The chaos harness (``chaos``) runs scenarios on top of it; see docs/simulator.md.
"""
