"""Open-loop evaluation of a saved policy on held-out episodes of its LeRobot dataset (``vla-recipes evaluate``).

    python recipes/evaluate.py --model outputs/demo-openvla --config recipes/demo/openvla.yaml

``python recipes/evaluate.py --help`` lists the arguments; the work is
:func:`vla_recipes.evaluation.evaluate_open_loop`.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder heads sys.path, where this file would shadow the `evaluate` library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from vla_recipes.cli import run_main  # noqa: E402
from vla_recipes.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
