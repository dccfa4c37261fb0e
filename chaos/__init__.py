"""Fault injection for trio-kv clusters: real processes, real networks, real partitions.

Library entry points: :class:`chaos.cluster.Cluster` (``up``/``attach`` and the verbs),
:class:`chaos.client.KVClient` (a recording causal client), :mod:`chaos.history` (the checker).
The CLI is ``python -m chaos``; see ``chaos/README.md``.
"""
