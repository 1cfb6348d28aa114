# make demo | make test | make bench : each installs into .venv/ first when it is missing or stale.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prompttune-installed

.PHONY: install test test-slow demo bench clean
install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh constraints/cpu.txt
	bash scripts/install.sh
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/prompttune demo

bench: $(STAMP)
	$(BIN)/prompttune bench all bench.threads=1 data.batch_size=32 --steps 20 --json runs/bench.json

clean:
	rm -rf runs .pytest_cache
