"""Fine-tune a VLA policy (OpenVLA, pi0.5) on a LeRobot dataset.

    accelerate launch recipes/sft.py --config recipes/demo/openvla.yaml [--any_field value ...]
    accelerate launch -m vla_recipes.cli sft --config recipes/demo/openvla.yaml

The recipe YAML chooses the model, the dataset and the fine-tuning mode; the accelerate config chooses the hardware
strategy. Every check that can fail runs before the weights are loaded (:mod:`vla_recipes.pipeline`).
"""

from __future__ import annotations

import logging

import transformers

from vla_recipes.configs import parse_recipe
from vla_recipes.pipeline import FinetuneResult, run


def main(args: list[str] | None = None) -> FinetuneResult:
    model_args, data_args, training_args = parse_recipe(args)
    # INFO on the process that logs (the main one; each node's with log_on_each_node), warnings and errors on all:
    # 64 ranks repeating every line would bury the one that matters.
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    return run(model_args, data_args, training_args)
