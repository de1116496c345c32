"""Configuration: one YAML file plus environment overrides; errors name the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", ["config/gateway.example.yaml", "config/gateway.docker.yaml"])
def test_shipped_configs_load(path: str) -> None:
    settings = load_settings(ROOT / path, env={})
    assert "gpt-image-1" in settings.models and "default" in settings.plans


def test_environment_overrides_and_secrets() -> None:
    env = {"TTAPI_API_KEY": " k1, k2 ,,k3", "UPSTREAM_BASE_URL": "http://up:9/", "REDIS_URL": "redis://r:1/2",
           "GATEWAY_ADMIN_TOKEN": "adm"}
    s = parse_settings({"upstream": {"base_url": "https://api.ttapi.io"}}, env=env)
    assert s.upstream.api_keys == ("k1", "k2", "k3")
    assert s.upstream.base_url == "http://up:9" and s.redis.url == "redis://r:1/2" and s.admin_token == "adm"


def test_server_workers_and_grace_come_from_the_file_or_the_environment() -> None:
    assert parse_settings({}, env={}).server.workers is None  # the usable cores
    file = {"server": {"workers": 3, "grace_seconds": 30}}
    assert parse_settings(file, env={}).server.workers == 3
    s = parse_settings(file, env={"GATEWAY_WORKERS": "4", "GATEWAY_GRACE_SECONDS": "600"})
    assert (s.server.workers, s.server.grace_seconds) == (4, 600)
    s = parse_settings(file, env={"GATEWAY_WORKERS": " ", "GATEWAY_GRACE_SECONDS": ""})  # empty: the file's
    assert (s.server.workers, s.server.grace_seconds) == (3, 30)


@pytest.mark.parametrize(("env", "reason"), [
    ({"GATEWAY_WORKERS": "two"}, "must be an integer, got 'two'"),
    ({"GATEWAY_WORKERS": "0"}, "must be > 0"),
    ({"GATEWAY_WORKERS": "1.5"}, "must be an integer"),
    ({"GATEWAY_GRACE_SECONDS": "-1"}, "must be >= 0"),
    ({"GATEWAY_GRACE_SECONDS": "soon"}, "must be a number, got 'soon'"),
])
def test_bad_server_environment_names_the_variable(env: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({}, env=env)
    assert info.value.key == next(iter(env)) and reason in str(info.value)


@pytest.mark.parametrize(("raw", "key", "reason"), [
    ({"upstream": {"api_keys": ["k"]}}, "upstream.api_keys", "unknown key"),
    ({"upstream": {"timeout_seconds": 0}}, "upstream.timeout_seconds", "> 0"),
    ({"upstream": {"timeout_seconds": "600"}}, "upstream.timeout_seconds", "must be a number"),
    ({"redis": {"on_unavailable": "maybe"}}, "redis.on_unavailable", "'reject' or 'allow'"),
    ({"redis": {"url": "http://x"}}, "redis.url", "redis://"),
    ({"metrics": {"user_label": "no"}}, "metrics.user_label", "true or false"),
    ({"metrics": {"flush_seconds": 0}}, "metrics.flush_seconds", "must be > 0"),
    ({"metrics": {"flush_seconds": 61}}, "metrics.flush_seconds", "must be <= 60, got 61"),
    ({"metrics": {"flush_seconds": "1s"}}, "metrics.flush_seconds", "must be a number"),
    ({"default_model": "gpt-4o"}, "default_model", "not enabled"),
    ({"models": {"x": {"family": "flux"}}}, "models.x.family", "must be one of"),
    ({"plans": {"p": {"requests_per_minut": 1}}}, "plans.p.requests_per_minut", "unknown key"),
    ({"plans": {"p": {"tokens_per_day": 1.5}}}, "plans.p.tokens_per_day", "integer"),
    ({"plans": {"p": {"models": ["gpt-4o"]}}}, "plans.p.models", "not enabled"),
    ({"keys": [{"user": "u", "sha256": "sk-igw-plaintext"}]}, "keys[0].sha256", "never the key"),
    ({"keys": [{"user": "u{x}", "sha256": "a" * 64}]}, "keys[0].user", "letters"),
    ({"keys": [{"user": "carol\n", "sha256": "a" * 64}]}, "keys[0].user", "letters"),
    ({"keys": [{"user": "u", "team": "art\n", "sha256": "a" * 64}]}, "keys[0].team", "letters"),
    ({"keys": [{"user": "u", "name": "\x1b[2J", "sha256": "a" * 64}]}, "keys[0].name", "control"),
    ({"keys": [{"user": "u", "sha256": "a" * 64, "limits": {"usd_per_month": 1e308}}]},
     "keys[0].limits.usd_per_month", "below"),
    ({"plans": {"p": {"tokens_per_day": 10**12}}}, "plans.p.tokens_per_day", "below"),
    ({"plans": {"p": {"usd_per_month": -1.0}}}, "plans.p.usd_per_month", ">= 0"),
    ({"keys": [{"user": "u", "plan": "nope", "sha256": "a" * 64}]}, "keys[0].plan", "no plan"),
    ({"keys": [{"user": "u", "sha256": "a" * 64}, {"user": "v", "sha256": "A" * 64}]}, "keys[1].sha256",
     "duplicates"),
    ({"server": {"max_header_bytes": 0}}, "server.max_header_bytes", "> 0"),
    ({"server": {"intake_concurrency": 0}}, "server.intake_concurrency", "> 0"),
    ({"server": {"header_timeout_seconds": "30s"}}, "server.header_timeout_seconds", "must be a number"),
    ({"surprise": 1}, "surprise", "unknown key"),
    ({"max_edit_body_bytes": 10}, "max_edit_body_bytes", ">= 1024"),
    ({"models": {"gpt-image-1": {"input_image_tokens_per_image": 1.5}}},
     "models.gpt-image-1.input_image_tokens_per_image", "integer"),
])
def test_bad_config_names_the_key_and_the_reason(raw: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, env={})
    assert info.value.key == key and reason in str(info.value)


def test_metrics_flush_seconds_defaults_to_one_and_goes_up_to_a_minute() -> None:
    assert parse_settings({}, env={}).metrics.flush_seconds == 1.0
    for seconds in (0.25, 60):
        assert parse_settings({"metrics": {"flush_seconds": seconds}}, env={}).metrics.flush_seconds == seconds


def test_unreadable_or_invalid_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("plans: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, env={})


def test_a_plan_removed_from_the_config_falls_back_to_default_not_unlimited() -> None:
    settings = parse_settings({"plans": {"default": {"requests_per_minute": 7}}}, env={})
    assert settings.plan("gone").limits.requests_per_minute == 7


def test_models_absent_enables_the_default_set_unpriced() -> None:
    s = parse_settings({}, env={})
    assert list(s.models) == ["gpt-image-2", "gpt-image-1.5", "gpt-image-1", "dall-e-2", "dall-e-3"]
    assert not any(m.priced for m in s.models.values())
    assert s.models["dall-e-3"].family == "dall-e-3" and s.models["gpt-image-2"].family == "gpt-image"


@pytest.mark.parametrize(("text", "key"), [
    ("plans: {default: {usd_per_month: .inf}}", "plans.default.usd_per_month"),
    ("plans: {default: {usd_per_month: .nan}}", "plans.default.usd_per_month"),
    ("plans: {default: {usd_per_month: -.inf}}", "plans.default.usd_per_month"),
    ("models: {gpt-image-1: {output_per_1m: .nan}}", "models.gpt-image-1.output_per_1m"),
    ("upstream: {timeout_seconds: .inf}", "upstream.timeout_seconds"),
])
def test_infinite_and_nan_numbers_in_yaml_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.key == key and "finite" in str(info.value)


def test_limits_just_below_the_maximum_are_accepted() -> None:
    s = parse_settings({"plans": {"default": {"tokens_per_day": 10**12 - 1, "usd_per_month": 999_999_999_999.0}}},
                       env={})
    assert s.plan("default").limits.tokens_per_day == 10**12 - 1


@pytest.mark.parametrize(("name", "ok"), [("_svc", True), (".ci@corp", True), ("-x", True), ("a" * 128, True),
                                          ("a" * 129, False), ("carol\n", False), ("u:x", False), ("{u}", False)])
def test_user_names_follow_the_spec_rule_as_a_whole_string(name: str, ok: bool) -> None:
    raw = {"keys": [{"user": name, "team": name, "sha256": "a" * 64}]}
    if ok:
        assert parse_settings(raw, env={}).keys[0].user == name
    else:
        with pytest.raises(ConfigError, match="user"):
            parse_settings(raw, env={})
