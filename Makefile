# The two commands that matter: `make demo` (run it) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
APT_TOOLS := docker-compose:docker-compose promtool:prometheus redis-server:redis-server chromium:chromium
BENCH_TOOLS := wrk:wrk redis-server:redis-server

.PHONY: demo test tools apt-tools bench lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Validators the deploy tests call (no Docker engine needed): Debian's docker-compose and promtool.
tools:
	@$(MAKE) --no-print-directory apt-tools TOOLS="$(APT_TOOLS)"

apt-tools:
	@missing=""; for pair in $(TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	fi

demo: $(VENV)/.installed
	$(VENV)/bin/gateway demo

test: $(VENV)/.installed tools
	$(PY) -m pytest -q -p no:cacheprovider

# Benchmark (by hand, not CI): gateway vs the fake upstream directly, ratios in bench/RESULTS.md.
bench: $(VENV)/.installed
	@$(MAKE) --no-print-directory apt-tools TOOLS="$(BENCH_TOOLS)"
	$(PY) -m bench.run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy gateway
