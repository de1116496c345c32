"""Buffered multiprocess values: in memory until a flush, then written exactly as prometheus-client writes them.

These tests also pin the prometheus-client internals buffered_values.py relies on (pyproject.toml
bounds the version): metrics look ``values.ValueClass`` up at child creation, the file names, and
what ``MultiProcessValue`` writes for the same operations.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.metering.buffered_values import MULTIPROC_ENV, buffered_value_class

ROOT = Path(__file__).resolve().parents[2]


def exercise(cls: Any, directory: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Metrics of every kind the gateway uses, created with ``cls`` as the value class, then updated."""
    directory.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    monkeypatch.setattr(values, "ValueClass", cls)
    r = CollectorRegistry()
    requests = Counter("t_requests_total", "Requests.", ("route", "status"), registry=r)
    duration = Histogram("t_duration_seconds", "Durations.", ("route",), buckets=(0.01, 0.1, 1), registry=r)
    inflight = Gauge("t_inflight", "In flight.", ("route",), multiprocess_mode="livesum", registry=r)
    queued = Gauge("t_queued", "Queued.", multiprocess_mode="max", registry=r)
    level = Gauge("t_level", "Level (mode all: one series per pid).", registry=r)
    requests.labels("/a", "200").inc()
    requests.labels("/a", "200").inc(2.5)
    requests.labels("/b", "500")  # created, never counted: a zero series
    for seconds in (0.005, 0.05, 0.5, 5):
        duration.labels("/a").observe(seconds)
    inflight.labels("/a").inc(3)
    inflight.labels("/a").dec()
    queued.set(7)
    level.set(-2)
    return {"requests": requests, "duration": duration, "inflight": inflight, "queued": queued, "level": level}


def collected(directory: Path) -> dict[str, list[Any]]:
    """What /metrics would show for the files in ``directory``, by metric."""
    return {m.name: sorted(m.samples, key=lambda s: (s.name, sorted(s.labels.items())))
            for m in MultiProcessCollector(None, path=str(directory)).collect()}


def test_values_are_written_as_multiprocess_value_writes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stock = values.MultiProcessValue()
    exercise(stock, tmp_path / "stock", monkeypatch)
    stock.close_all_files()
    buffered = buffered_value_class()
    metrics = exercise(buffered, tmp_path / "buffered", monkeypatch)

    # Before the flush: every series is in the files, at 0; the process itself sees its values.
    before = collected(tmp_path / "buffered")
    assert {s.value for samples in before.values() for s in samples} == {0.0}
    assert metrics["requests"].labels("/a", "200")._value.get() == 3.5
    # 2 counters changed (one never was), 1 histogram sum + 4 buckets, 3 gauges.
    assert buffered.flush() == 1 + 5 + 3
    assert buffered.flush() == 0

    names = sorted(p.name for p in (tmp_path / "stock").iterdir())
    pid = os.getpid()
    assert names == sorted(f"{prefix}_{pid}.db" for prefix in ("counter", "histogram", "gauge_livesum", "gauge_max",
                                                                "gauge_all"))
    assert names == sorted(p.name for p in (tmp_path / "buffered").iterdir())
    for name in names:  # the same keys, at the same places, with the same values
        assert (tmp_path / "buffered" / name).read_bytes() == (tmp_path / "stock" / name).read_bytes(), name
    assert collected(tmp_path / "buffered") == collected(tmp_path / "stock")
    assert dict((s.name, s.value) for s in collected(tmp_path / "buffered")["t_duration_seconds"]
                if s.labels.get("le") in (None, "+Inf")) == {"t_duration_seconds_bucket": 4.0,
                                                            "t_duration_seconds_count": 4.0,
                                                            "t_duration_seconds_sum": 5.555}


def test_a_flush_writes_exactly_the_values_changed_since_the_last(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cls = buffered_value_class()
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    a = cls("counter", "c", "c_total", ("k",), ("a",), "help")
    b = cls("counter", "c", "c_total", ("k",), ("b",), "help")
    a.inc(1)
    b.inc(2)
    assert cls.flush() == 2
    path = tmp_path / f"counter_{os.getpid()}.db"
    other = MmapedDict(str(path))  # another writer marks b's entry: a flush that rewrote b would undo it
    other.write_value(mmap_key("c", "c_total", ("k",), ("b",), "help"), 99.0, 0.0)
    a.inc(1)
    a.set(10.0, timestamp=5.0)
    assert (a.get(), b.get()) == (10.0, 2.0)
    assert cls.flush() == 1
    other.close()
    written = {key: (value, ts) for key, value, ts, _ in MmapedDict.read_all_values_from_file(str(path))}
    assert written == {mmap_key("c", "c_total", ("k",), ("a",), "help"): (10.0, 5.0),
                       mmap_key("c", "c_total", ("k",), ("b",), "help"): (99.0, 0.0)}
    assert a.get_exemplar() is None and a.set_exemplar(object()) is None


def test_metrics_take_their_value_class_when_a_child_is_created(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The install point: prometheus-client reads ``values.ValueClass`` for every new child, not at import."""
    cls = buffered_value_class()
    m = exercise(cls, tmp_path / "d", monkeypatch)
    assert isinstance(m["requests"].labels("/c", "200")._value, cls)
    assert isinstance(m["inflight"].labels("/c")._value, cls)
    child = m["duration"].labels("/c")
    assert isinstance(child._sum, cls) and all(isinstance(b, cls) for b in child._buckets)


SCRIPT = """
import os, sys
from prometheus_client import values
from gateway.metering import buffered_values
from gateway.metering.metrics import Metrics
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    print(values.ValueClass is values.MutexValue, buffered_values.flush())
    sys.exit()
m = Metrics()
requests = m.requests.labels("/v1/images/generations", "gpt-image-1", "200")
requests.inc(3)  # not flushed before the fork: the child must not write it
pid = os.fork()
if pid == 0:
    requests.inc()
    buffered_values.flush()
    os._exit(0)
os.waitpid(pid, 0)
buffered_values.flush()
print(type(requests._value).__name__, os.getpid(), pid)
"""


def test_installed_on_import_only_in_multiprocess_mode_and_a_forked_child_counts_apart(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=60, check=True)
    assert run.stdout.split() == ["True", "0"]  # one worker: prometheus-client's own in-memory values
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT,
                         env={**env, MULTIPROC_ENV: str(tmp_path)}, timeout=60, check=True)
    name, parent, child = run.stdout.split()
    assert name == "BufferedValue"
    key = mmap_key("gateway_requests", "gateway_requests_total",
                   ("route", "model", "status"), ("/v1/images/generations", "gpt-image-1", "200"),
                   "Requests answered, by route, model and HTTP status.")
    for pid, count in ((parent, 3.0), (child, 1.0)):
        found = {k: v for k, v, _, _ in MmapedDict.read_all_values_from_file(str(tmp_path / f"counter_{pid}.db"))}
        assert found[key] == count
