# vla-recipes: `make demo` installs and runs the CPU demo, `make test` installs and runs the tests.
PYTHON ?= python3.12
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= data/synthetic_reach
DEMO_OUT ?= outputs/demo-openvla
DEMO_PI05_OUT ?= outputs/demo-pi05
DEMO_OFT_OUT ?= outputs/demo-openvla-oft
ACCELERATE := $(BIN)/accelerate launch --config_file accelerate_configs/single_gpu.yaml

.PHONY: install demo demo-pi05 demo-oft test test-slow bench bench-gpu lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps "openpi-client==0.1.2"  # the robot-side client the serving tests use; pins numpy<2
	touch $@

$(DEMO_DATA)/meta/info.json: | install
	$(BIN)/python -m vla_recipes.data.synthetic --root $(DEMO_DATA) --num_episodes 100 \
		--cameras observation.images.image observation.images.wrist_image

# Tiny OpenVLA fine-tuned on the synthetic dataset, saved, reloaded with AutoModel, actions predicted.
demo: install $(DEMO_DATA)/meta/info.json
	$(ACCELERATE) recipes/sft.py --config recipes/demo/openvla.yaml --output_dir $(DEMO_OUT) --overwrite_output_dir true
	$(BIN)/python recipes/evaluate.py --model $(DEMO_OUT) --config recipes/demo/openvla.yaml

# The same with a tiny pi0.5 (flow matching, two cameras, action chunks of 10).
demo-pi05: install $(DEMO_DATA)/meta/info.json
	$(ACCELERATE) recipes/sft.py --config recipes/demo/pi05.yaml --output_dir $(DEMO_PI05_OUT) --overwrite_output_dir true
	$(BIN)/python recipes/evaluate.py --model $(DEMO_PI05_OUT) --config recipes/demo/pi05.yaml

# The same with a tiny OpenVLA-OFT (two cameras + state, chunks of 8 decoded in parallel, L1 regression).
demo-oft: install $(DEMO_DATA)/meta/info.json
	$(ACCELERATE) recipes/sft.py --config recipes/demo/openvla_oft.yaml --output_dir $(DEMO_OFT_OUT) --overwrite_output_dir true
	$(BIN)/python recipes/evaluate.py --model $(DEMO_OFT_OUT) --config recipes/demo/openvla_oft.yaml

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no slow test collected

# CPU benchmarks against the peers, each printing its ratios (process CPU time on BENCH_THREADS threads, default 1);
# the recorded figures are in benchmarks/RESULTS.md.
bench: install
	@for script in benchmarks/[!_]*.py; do \
		[ $$script = benchmarks/gpu.py ] && continue; \
		echo "== $$script"; BENCH_THREADS=$${BENCH_THREADS:-1} $(BIN)/python $$script || exit 1; \
	done

# One CUDA device: memory, s/step and latency at the real sizes, < 8 min (outputs/gpu/gpu.md and gpu.json). No GPU:
# `$(BIN)/python benchmarks/gpu.py --tiny` checks the same code on the CPU. A GPU machine without PyPI:
# benchmarks/gpu_check.sh.
bench-gpu: install
	$(BIN)/python benchmarks/gpu.py --out outputs/gpu

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs data
