# arbstr: `make run` starts the proxy in front of mock providers, `make test` runs every test.
# Needs a Python >= 3.12 (mitmproxy 12): taken from $(PYTHON) if set, else PATH, else pyenv's versions.

VENV := .venv
BIN := $(VENV)/bin
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)

define find_python
for c in $(PYTHON) python3.13 python3.12 python3 python $$(ls -d $(PYENV_ROOT)/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
  if "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then echo "$$c"; exit 0; fi; \
done; exit 1
endef

# `arbstr serve` runs under python -O: compile the optimized bytecode once here, or every start
# compiles it again wherever bytecode is not written (PYTHONDONTWRITEBYTECODE): ~1 s a start.
define compile_optimized
$(BIN)/python -m compileall -qq -o 1 -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') arbstr \
  || echo "note: some files did not compile ahead; Python compiles them when they are imported"
endef

# nutshell's wallet types and crypto, without its pinned dependencies (see pyproject.toml); the test
# mint runs the same version from a venv of its own, where its pins hold (arbstr/testing/mint.py).
CASHU := cashu==0.20.2
MINT_VENV := .venv-mint

.PHONY: install test-deps run test bench capture clean

PROVIDER ?= http://127.0.0.1:8000
NAME ?= capture

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@py=$$($(find_python)) || { echo "arbstr needs Python >= 3.12 (mitmproxy 12). None found on PATH or in $(PYENV_ROOT)/versions: install one (e.g. 'pyenv install 3.12') or run 'make PYTHON=/path/to/python3.12'." >&2; exit 1; }; \
	if [ ! -x $(BIN)/python ] || ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	  echo "creating $(VENV) with $$py ($$($$py --version))"; rm -rf $(VENV); "$$py" -m venv $(VENV) || exit 1; \
	fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps '$(CASHU)'
	@$(compile_optimized)
	@touch $@

test-deps: $(VENV)/.test-installed $(MINT_VENV)/.installed

# A real Cashu mint for the wallet tests (FakeWallet Lightning backend); on Python 3.12 nutshell
# needs marshmallow<4 and limits<4.
$(MINT_VENV)/.installed:
	@py=$$($(find_python)) || { echo "the test mint needs Python >= 3.12" >&2; exit 1; }; \
	rm -rf $(MINT_VENV) && "$$py" -m venv $(MINT_VENV)
	$(MINT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check '$(CASHU)' 'marshmallow<4' 'limits<4'
	@touch $@

# The PostgreSQL tests start a server of their own from the machine's PostgreSQL binaries; the
# dashboard's browser tests drive Debian's chromium; promtool checks the /metrics exposition.
$(VENV)/.test-installed: $(VENV)/.installed
	@ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  echo "installing PostgreSQL (apt) for the ledger tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
	@command -v chromium >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
	  && [ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || { \
	  echo "installing chromium and an emoji font (the dashboard's and mitmweb's browser tests) and prometheus (promtool) (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji prometheus >/dev/null; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing Node.js and npm (apt) for the openai Node SDK test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	cd tests/e2e/node && npm ci --no-audit --no-fund --loglevel=error
	@$(compile_optimized)
	@touch $@

run: install
	$(BIN)/arbstr serve --mock

test: test-deps
	$(BIN)/python -m pytest -q

bench: test-deps
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/router.py
	$(BIN)/python bench/recording.py
	$(BIN)/python bench/budgets.py

# Record a live provider's exchanges for the replay tests: point a client at 127.0.0.1:8090
# (e.g. base_url=http://127.0.0.1:8090/v1 with the provider's key), then Ctrl-C.
# Keys and Cashu tokens are replaced by REDACTED before anything is written.
capture: install
	$(BIN)/mitmdump -s tests/flows/capture.py --mode reverse:$(PROVIDER) --listen-host 127.0.0.1 -p 8090 \
	  --set capture_file=tests/flows/$(NAME).mitm

clean:
	rm -rf $(VENV) $(MINT_VENV) build *.egg-info .pytest_cache
