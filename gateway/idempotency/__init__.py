"""Idempotency-Key (SPEC §9): a repeat of a request gets the first one's stored answer."""
