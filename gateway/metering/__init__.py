"""What a finished request used: metrics, pricing, ledger, settlement."""
