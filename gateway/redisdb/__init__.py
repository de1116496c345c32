"""The Redis client and the one key layout."""
