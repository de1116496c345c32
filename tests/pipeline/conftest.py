"""The pipeline tests share one fake upstream per module (test_gateway's fixture)."""

from tests.pipeline.test_gateway import fake  # noqa: F401 (a fixture, found by pytest by name)
