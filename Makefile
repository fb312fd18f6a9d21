# vla-recipes: `make demo` installs and runs the CPU demo, `make test` installs and runs the tests.
PYTHON ?= python3.12
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= data/synthetic_reach
DEMO_OUT ?= outputs/demo-openvla
DEMO_PI05_OUT ?= outputs/demo-pi05
DEMO_OFT_OUT ?= outputs/demo-openvla-oft
ACCELERATE := $(BIN)/accelerate launch --config_file accelerate_configs/single_gpu.yaml
# Closed loop in MetaWorld (make demo-sim): expert demonstrations, a tiny pi0.5, 50 rollouts on unseen seeds.
# drawer-open-v3 by default: the tiny pi0.5 opens the drawer in 45-46/50 unseen seeds, presses button-press-topdown-v3
# in 35/50; on reach-v3 it gets 46% with 5x the demos and 2x the steps (benchmarks/RESULTS.md). Another task:
# make demo-sim SIM_TASK=reach-v3
SIM_TASK ?= drawer-open-v3
SIM_DATA ?= data/mw_$(SIM_TASK)
SIM_OUT ?= outputs/demo-sim-pi05
SIM_STEPS ?= 2000
SIM_ENV = '{"task": "$(SIM_TASK)", "image_size": 112, "episode_length": 150}'
# MuJoCo renders headless (a comment after the value would become part of it)
export MUJOCO_GL ?= egl

.PHONY: install install-sim demo demo-pi05 demo-oft sim-data demo-sim test test-slow bench bench-gpu lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps "openpi-client==0.1.2"  # the robot-side client the serving tests use; pins numpy<2
	touch $@

# The simulators (PushT, MetaWorld + MuJoCo) for recipes/rollout.py and vla_recipes.data.collect.
install-sim: $(VENV)/.installed-sim

$(VENV)/.installed-sim: $(VENV)/.installed
	$(BIN)/pip install -e ".[dev,sim]"
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

# Scripted-expert demonstrations (cached), a tiny pi0.5 trained on them, then 50 rollouts on seeds never collected
# (0-49; collection uses 100000+), next to the expert and a random policy on the same seeds.
# The collector runs every time: it reuses $(SIM_DATA) only if collected with these settings by this collector version.
sim-data: install-sim
	$(BIN)/python -m vla_recipes.data.collect --env metaworld --task $(SIM_TASK) --episodes 100 --root $(SIM_DATA) \
		--image_size 112 --episode_length 150

# The baselines render on one core while the model's rollout runs on the other.
demo-sim: sim-data
	$(ACCELERATE) recipes/sft.py --config recipes/demo/metaworld_pi05.yaml --dataset_root $(SIM_DATA) \
		--dataset_repo_id local/mw_$(SIM_TASK) --max_steps $(SIM_STEPS) --output_dir $(SIM_OUT) --overwrite_output_dir true
	for baseline in expert random; do \
		$(BIN)/python recipes/rollout.py --baseline $$baseline --output_dir $(SIM_OUT)-$$baseline \
			--env metaworld_sized --env_kwargs $(SIM_ENV) --n_episodes 50 --batch_size 10 --videos 0 || exit 1; \
	done > $(SIM_OUT)-baselines.log 2>&1 & baselines=$$!; \
	$(BIN)/python recipes/rollout.py --model $(SIM_OUT) --env metaworld_sized --env_kwargs $(SIM_ENV) \
		--n_episodes 50 --batch_size 10 --n_action_steps 5 || exit 1; \
	wait $$baselines || { tail -20 $(SIM_OUT)-baselines.log; exit 1; }
	$(BIN)/python recipes/closed_loop_summary.py $(SIM_OUT) $(SIM_OUT)-expert $(SIM_OUT)-random

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
