"""The upstream (TTAPI): client, relay of its answers, usage observers."""
