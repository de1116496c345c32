"""Asynchronous image jobs (SPEC section 10): submission, the durable queue, the runner, webhooks."""
