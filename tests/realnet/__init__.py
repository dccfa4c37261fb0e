"""Real-network tier: chaos scenarios over namespaces and containers."""
