# The two commands of the README:
#   make serve   - run the App on the embedded default (local mode, own data system worker, demo model)
#   make test    - run the test suite
#   make bench   - the weight and replica-start benchmarks (ARGS=--quick for the small shapes); writes
#                  BENCHMARKS.md
#   make traffic - the bursty traffic replay, fixed vs autoscaled; writes bench/out/traffic.*
#   make chaos   - faults under streaming load, and the Router's own cost; writes bench/out/chaos.*
#   make kv      - prefix reuse through the data system, with and without the KV connector; writes
#                  bench/out/kv.*
#   make pd      - disaggregated prefill/decode against merged serving; writes bench/out/pd.*
#   make nodes   - weights across simulated nodes: fetch, map, fan-out; writes bench/out/nodes.*
#   make zero    - scale to zero and back: first token from zero, a burst at zero, memory at zero;
#                  writes bench/out/zero.*
#   make seedcase - the original case's 7B headline: Qwen2.5-7B's shape with PTP=2 through
#                  entrypoint.py and POST /scaleout, beside vLLM's own loader (builds the 15 GB demo
#                  model on first use; needs 24 GB of RAM); writes BENCHMARKS.md and bench/out/seedcase.*
# Both create .venv and install the pinned stack on first use (and again when a requirements file or
# pyproject.toml changes).

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test bench traffic chaos kv pd nodes zero seedcase clean

serve: $(STAMP)
	$(VENV)/bin/python entrypoint.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/pip install -q -r requirements-bench.txt
	$(VENV)/bin/python -m bench.run $(ARGS)
	$(VENV)/bin/python -m bench.start $(ARGS)

traffic: $(STAMP)
	$(VENV)/bin/pip install -q -r requirements-bench.txt
	$(VENV)/bin/python -m bench.traffic $(ARGS)

chaos: $(STAMP)
	$(VENV)/bin/python -m bench.chaos $(ARGS)

kv: $(STAMP)
	$(VENV)/bin/python -m bench.kv $(ARGS)

pd: $(STAMP)
	$(VENV)/bin/python -m bench.pd $(ARGS)

nodes: $(STAMP)
	$(VENV)/bin/pip install -q -r requirements-bench.txt
	$(VENV)/bin/python -m bench.nodes $(ARGS)

zero: $(STAMP)
	$(VENV)/bin/python -m bench.zero $(ARGS)

seedcase: $(STAMP)
	$(VENV)/bin/python -m bench.seedcase $(ARGS)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-test.txt
	# PyPI's builds of these are CUDA builds that break `transformers` imports on CPU; vLLM's text
	# models need none of them.
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# Installed (editable) so that vLLM finds our load format's entry point in every process.
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info
