"""A deterministic simulator: several nodes' cores and clients over a simulated network.

No trio, httpx, hypercorn or starlette: one event queue, one seeded RNG, simulated time.
The same seed gives the same trace (and digest) on any machine.  ``python -m trio_kv.sim``.
"""

from .world import SimResult, simulate

__all__ = ["SimResult", "simulate"]
