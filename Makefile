# Two commands on a fresh machine with only Python 3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.thermokd-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo data test test-slow bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel pinned for this machine) so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The main job: a method comparison on the embedded digits data (a couple of minutes on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/thermokd compare --data digits --methods ce,kd,cist,dts,ctkd,lskd,entropy-target --seeds 3 \
		--out runs/demo --no-progress

# Fashion-MNIST from Debian's package (needs apt and root, as on the machines this project runs on).
data:
	@test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP) data
	$(PY) benchmarks/loss_overhead.py --large
	$(PY) benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
