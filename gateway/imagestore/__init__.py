"""The S3-compatible image store: content-addressed images behind presigned URLs (SPEC section 9)."""
