# Two commands do everything on a fresh machine:
#   make demo   - install into .venv, then run the demo on generated phantoms
#   make test   - install into .venv, then run the test suite
#   make lint   - ruff on the repository, mypy on the package and the benchmarks (what CI runs after the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.nnunet_ssl_installed
# pytest-xdist workers: the end-to-end tests spend much of their time in single-threaded work
# (imports, preprocessing, export), so two workers on two cores finish sooner than one (14 min 49 s in
# a fresh clone, 2026-12-06, docs/benchmarks.md; about 28 min estimated for one worker from the serial
# durations, 2026-11-29).
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint

install: $(INSTALLED)

$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/nnunet-ssl demo --out demo_work

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: $(INSTALLED)
	$(BIN)/python -m pytest -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

# Unit tests only: workers steal single tests (a module fixture may then be built on both workers), which
# balances the two workers a little better than whole files (1 min 57.6 s and 2 min 01.3 s against 2 min 02.6 s and 2 min 02.7 s, idle, 2026-12-05;
# 1 min 51.8 s and 1 min 50.3 s for 948 tests on 2026-12-06, docs/benchmarks.md).
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -ra --durations=15 -n $(TEST_WORKERS) --dist worksteal -m "not e2e"; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

# ruff (rules in ruff.toml) on every file, then mypy (mypy.ini) through .ci/typecheck, which stages the
# four package folders as the one nnunet_ssl namespace; both run, and either finding fails the target.
lint: $(INSTALLED)
	status=0; $(BIN)/ruff check . || status=1; \
	MYPY="$(abspath $(BIN))/mypy" .ci/typecheck || status=1; exit $$status
