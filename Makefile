# make demo | make test | make bench : each installs into .venv/ first when it is missing or stale.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prompttune-installed

.PHONY: install test test-slow demo bench bench-curves gpu-check clean
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

# scaling curves on the CPU, random weights at real sizes, one thread (docs/bench.md; ~20 min of CPU,
# of which mae_vqgan_batch ~1.5 and blip2_opt125m_k ~3.5 min; the BLIP-2 curve peaks at ~9 GiB of RAM)
bench-curves: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/prompttune bench --sweep retrieval coop_classes mhub_k vpt_prompts vpt_deep_prompts mae_vqgan_batch blip2_opt125m_k --out docs/bench_curves

# one short check on one GPU (< 8 min); exits 2 when there is none (scripts/gpu_check.sh)
gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

clean:
	rm -rf runs .pytest_cache
