"""Open-loop evaluation of a saved policy on held-out episodes of its LeRobot dataset.

    python recipes/evaluate.py --model outputs/demo-openvla --config recipes/demo/openvla.yaml
    vla-recipes evaluate --model me/openvla-libero --dataset_repo_id lerobot/libero_spatial_image \\
        --episodes 400:432 --output_dir outputs/eval/openvla-libero

Reloads the model and processor with ``AutoModel`` / ``AutoProcessor``, predicts every frame's action chunk
with the batched ``predict_action`` a user calls, and compares it with the recorded actions in the dataset's
units (chunk steps past an episode's end left out): per-dimension, per-step and mean L1 / MSE, and for OpenVLA
the action-token accuracy. The dataset keys come from the recipe (``--config``) and/or the command line (any
``DataArguments`` field, CLI first); the episodes are ``--episodes`` or the recipe's ``eval_episodes``.

Writes ``open_loop_*`` keys into ``<output_dir>/eval_results.json`` (next to the trainer's ``eval_*`` ones),
PNG plots of a few episodes into ``<output_dir>/plots/``, and the metrics into the model card
(``README.md``: ``model-index`` and an "Open-loop evaluation" section; a re-run replaces them).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import torch
from transformers import HfArgumentParser

from vla_recipes.configs import DataArguments, load_recipe_yaml, parse_episodes
from vla_recipes.evaluation import evaluate_open_loop


def parse_args(args: list[str] | None = None) -> tuple[DataArguments, argparse.Namespace]:
    """Our flags plus every ``DataArguments`` field; the recipe's values are the defaults (CLI > YAML)."""
    parser = HfArgumentParser(DataArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Output folder or Hub id of a fine-tuned model.")
    parser.add_argument("--config", default=None, help="A recipe YAML: its dataset keys are the defaults.")
    parser.add_argument(
        "--episodes", default=None, help="Episodes to evaluate, e.g. '20:24,30' (default: eval_episodes)."
    )
    parser.add_argument("--output_dir", default=None, help="Where results go (default: --model when it is a folder).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers decoding the frames.")
    parser.add_argument("--plot_episodes", type=int, default=3, help="How many of the episodes to plot.")
    parser.add_argument("--plot_dims", type=int, default=8, help="Plot the first N action dimensions.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    argv = sys.argv[1:] if args is None else args
    if "--config" in argv:
        recipe = load_recipe_yaml(argv[argv.index("--config") + 1])
        parser.set_defaults(**{f.name: recipe[f.name] for f in fields(DataArguments) if f.name in recipe})
    data_args, cli = parser.parse_args_into_dataclasses(argv)
    return data_args, cli


def main(args: list[str] | None = None) -> dict:
    data_args, cli = parse_args(args)
    spec = cli.episodes or data_args.eval_episodes
    report = evaluate_open_loop(
        cli.model,
        data_args,
        parse_episodes(spec),
        cli.output_dir,
        batch_size=cli.batch_size,
        num_workers=cli.num_workers,
        plot_episodes_count=cli.plot_episodes,
        plot_dims=cli.plot_dims,
        device=cli.device,
        episodes_key="--episodes" if cli.episodes else "eval_episodes",
    )
    results = report.results
    print(f"open-loop on {results['num_frames']} frames of episodes {spec}:")
    print(f"  L1  {results['l1']:.4f}  per dim {[round(v, 4) for v in results['l1_per_dim']]}")
    print(f"  MSE {results['mse']:.5f}  per dim {[round(v, 5) for v in results['mse_per_dim']]}")
    if "action_token_accuracy" in results:
        bins = report.config.n_action_bins
        print(f"  action-token accuracy {results['action_token_accuracy']:.3f} (chance 1/{bins})")
    if "baseline_mean_action_l1" in results:
        print(f"  (always predicting the mean training action: L1 {results['baseline_mean_action_l1']:.4f})")
    plots = report.results_path.parent / "plots"
    print(f"wrote {report.results_path}, {len(report.plots)} plots in {plots}, metrics in {plots.parent / 'README.md'}")
    return results
