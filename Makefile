# Two commands on a fresh machine: `make toy` and `make test`. Each builds .venv if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On the CI/dev machines this resolves to a local CPU wheel; override on a GPU box, e.g.
#   make test TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
# The versions the tests run on; `make test CONSTRAINTS=` resolves the newest versions pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
TOY_OUT ?= runs/toy
LAB_OUT ?= runs/lab

.PHONY: test test-kernels toy toy-quick toy-sweep lab lab-quick replicate bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamp files make a re-run a no-op when pyproject.toml has not changed.
$(VENV)/.toy-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[toy]" $(PIP_CONSTRAINTS)
	touch $@

# The dev extras (pytest, hypothesis, xdist, jupytext, ...) come with the toy and full dependencies.
$(VENV)/.all-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[toy,full,dev]" $(PIP_CONSTRAINTS)
	touch $@ $(VENV)/.toy-installed

toy: $(VENV)/.toy-installed
	$(PY) -m toy --out $(TOY_OUT)

toy-quick: $(VENV)/.toy-installed
	$(PY) -m toy --out $(TOY_OUT)-quick --quick

# The claims map of docs/toy.md: one hyperparameter at a time, 3 seeds (minutes on 2 cores).
toy-sweep: $(VENV)/.toy-installed
	$(PY) -m toy.sweep --out runs/sweep

# The CPU image lab (docs/lab.md): every objective through the real full/ entry points on a tiny pretrained model.
lab: $(VENV)/.all-installed
	$(PY) -m full.lab --out $(LAB_OUT)

lab-quick: $(VENV)/.all-installed
	$(PY) -m full.lab --out $(LAB_OUT)-quick --quick

# The replication table (docs/replication.md): each paper's headline comparison, 3 training seeds, on the lab's model
# (pretrained into $(LAB_OUT) first if missing).
replicate: $(VENV)/.all-installed
	$(PY) -m full.lab.replicate --out runs/replication --lab $(LAB_OUT)

test: $(VENV)/.all-installed
	$(PY) -m pytest -n 2 --dist loadgroup tests

# The tests whose numbers depend on float rounding across runs, processes or a recorded file, again on torch's
# portable kernels with one thread (whatever the CPU would pick by default: AVX-512, AVX2, NEON): a tolerance fitted to
# one CPU's last bits fails here, not on a user's machine (docs/testing.md). CI runs it after `make test`.
KERNEL_TESTS ?= tests/test_toy.py tests/test_train_distributed.py tests/test_global_batch.py tests/test_golden.py \
	tests/test_identities.py tests/test_numerics.py tests/test_train_resume.py tests/test_flow.py \
	tests/test_flow_train.py tests/test_toy_flow.py tests/test_data_stream_resume.py
KERNELS ?= default
test-kernels: $(VENV)/.all-installed
	ATEN_CPU_CAPABILITY=$(KERNELS) OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup $(KERNEL_TESTS)

# The toy's wall time in calibration units (`python -m toy.calib`, the repository's fixed CPU workload;
# docs/benchmarks.md).
bench: $(VENV)/.all-installed
	$(PY) -m toy.bench

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
