"""trio-kv: a sharded, replicated, causally consistent key-value store."""
