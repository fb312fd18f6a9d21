"""Success rates of several ``recipes/rollout.py`` runs side by side, each with its 95% Wilson interval.

    python recipes/closed_loop_summary.py outputs/demo-sim-pi05 outputs/demo-sim-pi05-expert \\
        outputs/demo-sim-pi05-random

Each argument is a folder holding ``rollout_results.json``; the runs should share env, task, ``--seed`` and
``--n_episodes`` for the rates to be comparable (then each seed's goal is the same for every policy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vla_recipes.evaluation import wilson_interval


def run_summary(folder: Path) -> dict:
    """Successes and episodes of one rollout folder."""
    path = folder / "rollout_results.json"
    if not path.is_file():
        sys.exit(f"error: {path} not found; run recipes/rollout.py with --output_dir {folder} first")
    episodes = [e for task in json.loads(path.read_text())["per_task"] for e in task["metrics"]["successes"]]
    return {"successes": int(sum(episodes)), "n": len(episodes)}


def main(args: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="Folders with a rollout_results.json.")
    rows = []
    for folder in parser.parse_args(args).runs:
        run = run_summary(folder)
        low, high = wilson_interval(run["successes"], run["n"])
        rows.append(run | {"run": str(folder), "rate": run["successes"] / run["n"], "low": low, "high": high})
        print(f"{str(folder):<40} success {rows[-1]['rate']:6.1%}  ({run['successes']}/{run['n']}, "
              f"95% CI {low:.1%}-{high:.1%})")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
