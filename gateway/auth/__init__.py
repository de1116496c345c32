"""Who is calling: gateway keys, the key store, the brute-force guard."""
