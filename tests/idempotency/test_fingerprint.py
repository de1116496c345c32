"""What counts as "the same request" under one Idempotency-Key."""

from __future__ import annotations

import io

import orjson

from gateway.idempotency.fingerprint import form_fingerprint, json_fingerprint

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 600  # larger than one read


def test_json_key_order_and_spacing_do_not_count_but_values_do() -> None:
    a = orjson.loads(b'{"prompt": "a fox", "n": 2, "zz": {"b": 1, "a": [1, 2]}}')
    b = orjson.loads(b'{"zz":{"a":[1,2],"b":1},"n":2,"prompt":"a fox"}')
    assert json_fingerprint(a) == json_fingerprint(b)
    assert json_fingerprint(a) != json_fingerprint({**a, "n": 3})
    assert json_fingerprint(a) != json_fingerprint({**a, "zz": {"b": 1, "a": [2, 1]}})


def files(*contents: bytes) -> list[tuple[str, str, str, io.BytesIO]]:
    return [("image[]", f"in{i}.png", "image/png", io.BytesIO(c)) for i, c in enumerate(contents)]


def test_form_field_order_does_not_count_file_contents_and_order_do() -> None:
    fields = [("prompt", "add a hat"), ("model", "gpt-image-1")]
    other = PNG[:-1] + b"\x00"
    base = form_fingerprint(fields, files(PNG, other))
    assert form_fingerprint(list(reversed(fields)), files(PNG, other)) == base
    assert form_fingerprint(fields, files(other, PNG)) != base
    assert form_fingerprint(fields, files(PNG, PNG)) != base
    assert form_fingerprint([*fields, ("n", "2")], files(PNG, other)) != base
    renamed = [("image[]", "x.png", "image/png", io.BytesIO(PNG)), files(PNG, other)[1]]
    assert form_fingerprint(fields, renamed) != base
