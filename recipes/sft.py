"""Fine-tune a VLA policy (OpenVLA, pi0.5) on a LeRobot dataset (``vla-recipes sft``).

    accelerate launch recipes/sft.py --config recipes/demo/openvla.yaml [--any_field value ...]

The recipe YAML chooses the model, the dataset and the fine-tuning mode; the accelerate config chooses the hardware
strategy. The pipeline is :mod:`vla_recipes.pipeline` (``finetune`` from a notebook); every check that can fail
runs before the weights are loaded.
"""

from vla_recipes.cli import run_main
from vla_recipes.cli.sft import main

if __name__ == "__main__":
    run_main(main)
