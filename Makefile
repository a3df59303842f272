# The two set-up commands from the README: `make demo` and `make test`.
# Both create .venv and install what they need, so they work on a fresh machine.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (a CPU wheel is on disk); the library itself keeps it optional and loose.
TORCH := torch==2.13.0

.PHONY: demo test fuzz bench venv clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[worker,s3,test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m fabric.demo

# The status page's test drives a headless Chromium: Debian's, installed once as root (a
# quick `command -v` when it is there); without it tests/e2e/test_status_page.py skips.
BROWSER_TOOLS := chromium fonts-dejavu-core

# The reflink tests (tests/test_fileio.py, tests/test_pull.py, tests/e2e/test_one_copy_per_site.py)
# loop-mount an XFS: Debian's xfsprogs, installed once as root; without it they skip.
FS_TOOLS := xfsprogs

# promtool checks deploy/observability/alerts.yml: Debian's prometheus package, installed once as root;
# without it tests/deploy/test_observability.py skips that check.
OBSERVABILITY_TOOLS := prometheus

test: venv
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq $(BROWSER_TOOLS); } || echo "chromium not installed: the status page's test will skip"
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $(OBSERVABILITY_TOOLS); } || echo "promtool not installed: the alert rules' check will skip"
	@command -v mkfs.xfs >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $(FS_TOOLS); } || echo "mkfs.xfs not installed: the reflink tests will skip"
	$(BIN)/python -m pytest -q

# The generated-input suite at full size (make test runs it with 1500 cases): origin, agent, hook, parsers.
fuzz: venv
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/fuzz --fuzz-cases 10000

# The peers the benchmarks compare with, from Debian's packages (installed once, as root).
BENCH_TOOLS := rsync casync nginx-light aria2 curl zstd time xfsprogs

bench: venv
	@for t in rsync casync nginx aria2c curl zstd /usr/bin/time mkfs.xfs; do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $(BENCH_TOOLS); fi
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) demo-out bench-out
