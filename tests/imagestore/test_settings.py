"""The ``storage:`` section: defaults, checks, and credentials only from the environment."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_settings

ENV = {"STORAGE_ACCESS_KEY_ID": "AKIDSTORE1234", "STORAGE_SECRET_ACCESS_KEY": "s3cr3t-never-shown"}


def test_no_storage_section_means_no_store() -> None:
    s = parse_settings({}, env={}).storage
    assert (s.enabled, s.bucket, s.region, s.url_ttl_seconds, s.path_style) == (False, "images", "us-east-1",
                                                                                 3600, True)


def test_credentials_come_from_the_environment_and_never_show_in_a_repr() -> None:
    raw = {"storage": {"endpoint_url": "http://seaweedfs:8333/", "bucket": "gw-images", "url_ttl_seconds": 600}}
    settings = parse_settings(raw, env=ENV)
    s = settings.storage
    assert (s.endpoint_url, s.bucket, s.url_ttl_seconds) == ("http://seaweedfs:8333", "gw-images", 600)
    assert (s.access_key_id, s.secret_access_key) == (ENV["STORAGE_ACCESS_KEY_ID"], ENV["STORAGE_SECRET_ACCESS_KEY"])
    for text in (repr(settings), str(s)):
        assert ENV["STORAGE_SECRET_ACCESS_KEY"] not in text and ENV["STORAGE_ACCESS_KEY_ID"] not in text


def test_the_environment_can_name_the_endpoint() -> None:
    s = parse_settings({"storage": {"endpoint_url": None}}, env={"STORAGE_ENDPOINT_URL": "https://s3.example:9000"})
    assert s.storage.endpoint_url == "https://s3.example:9000" and s.storage.enabled


@pytest.mark.parametrize(("raw", "key", "reason"), [
    ({"secret_access_key": "in-the-file"}, "storage.secret_access_key", "unknown key"),
    ({"access_key_id": "in-the-file"}, "storage.access_key_id", "unknown key"),
    ({"endpoint_url": "http://user:pass@s3:8333"}, "storage.endpoint_url", "without path or credentials"),
    ({"endpoint_url": "s3.example.com"}, "storage.endpoint_url", "http(s) URL"),
    ({"endpoint_url": "http://s3:8333/images"}, "storage.endpoint_url", "without path"),
    ({"public_endpoint_url": "https://cdn.example/images"}, "storage.public_endpoint_url", "without path"),
    ({"bucket": "Images_1"}, "storage.bucket", "S3 bucket name"),
    ({"url_ttl_seconds": 0}, "storage.url_ttl_seconds", "1 to 604800"),
    ({"url_ttl_seconds": 8 * 86400}, "storage.url_ttl_seconds", "1 to 604800"),
    ({"path_style": "yes"}, "storage.path_style", "true or false"),
    ({"timeout_seconds": 0}, "storage.timeout_seconds", "> 0"),
])
def test_bad_storage_config_names_the_key(raw: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as failed:
        parse_settings({"storage": raw}, env=ENV)
    assert failed.value.key == key and reason in failed.value.reason
    assert "pass" not in str(failed.value)  # the URL's password is not echoed back
