# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean prometheus

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

demo: install prometheus
	$(BIN)/imagine demo

test: install prometheus
	$(BIN)/python -m pytest

# prometheus + promtool (Debian's package, ~25 s) when promtool is missing: `imagine up` runs a local Prometheus
# and the tests check the alert rules with promtool. Without systemd no daemon starts; with systemd the package
# also enables a system Prometheus on :9090 (see monitoring/README.md).
prometheus:
	@command -v promtool >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus || \
	  { $$SUDO apt-get update -q && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }; }
	@promtool --version | head -1

clean:
	rm -rf $(VENV) out .pytest_cache
