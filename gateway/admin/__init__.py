"""Admin API and CLI: keys and usage reports."""
