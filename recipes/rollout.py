"""Closed-loop rollouts of a saved policy in a LeRobot gym environment (``vla-recipes rollout``).

    python recipes/rollout.py --model outputs/pusht-pi05 --env pusht --n_episodes 50 --batch_size 10

``python recipes/rollout.py --help`` lists the arguments; the work is :func:`vla_recipes.closed_loop.rollout`.
"""

from vla_recipes.cli import run_main
from vla_recipes.cli.rollout import main

if __name__ == "__main__":
    run_main(main)
