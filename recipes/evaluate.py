"""Open-loop evaluation of a saved policy on held-out episodes of its LeRobot dataset.

    python recipes/evaluate.py --model outputs/demo-openvla --config recipes/demo/openvla.yaml
    python recipes/evaluate.py --model me/openvla-libero --dataset_repo_id lerobot/libero_spatial_image \
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
from pathlib import Path

# ruff: noqa: E402
# Run as a script, this file's folder heads sys.path, where this file would shadow the `evaluate` library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, HfArgumentParser

from vla_recipes.configs import DataArguments, RecipeError, load_recipe_yaml, parse_episodes
from vla_recipes.data.frame_cache import frame_resize_for
from vla_recipes.data.lerobot import VLADataset, check_episodes, load_metadata
from vla_recipes.data.state_selection import feature_dim
from vla_recipes.evaluation import (
    OPEN_LOOP_TASK,
    default_output_dir,
    open_loop_metrics,
    plot_episodes,
    predict_open_loop,
    update_eval_results,
)
from vla_recipes.hub import add_card_results

PREFIX = "open_loop_"


def parse_args(args: list[str] | None = None):
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


def model_config(model: str):
    """The saved model's config (cheap: no weights), or one line when ``--model`` is neither a folder here nor a
    model the Hub gives."""
    if Path(model).exists() and not Path(model).is_dir():
        raise RecipeError(f"--model {model!r} is a file; give the output folder of a run (or a Hub id)")
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: no such repo, or no network"
        raise RecipeError(
            f"--model {model!r} is not a folder here, and not a model the Hub gives ({why}); give a run's output "
            "folder or a Hub model id"
        ) from None


def check_model_fits_dataset(config, meta, data_args: DataArguments) -> None:
    """The model's cameras, action and state dims must be the dataset's: otherwise every frame would be predicted
    before the comparison fails (or, for the state, the model would read other dims than it was trained on)."""
    missing = [k for k in config.camera_keys if k not in meta.camera_keys]
    if missing:
        cameras = meta.camera_keys
        raise RecipeError(f"the model's camera_keys {missing} are not cameras of the dataset; it has {cameras}")
    action_dim = feature_dim(meta, data_args.action_key)
    if action_dim != config.action_dim:
        raise RecipeError(
            f"the dataset's {data_args.action_key!r} has {action_dim} dims but the model predicts {config.action_dim}: "
            "evaluate on the dataset the model was trained on (or one with its action space), or set action_key"
        )
    state_dim, key = getattr(config, "state_dim", None), data_args.state_key
    if state_dim is not None and key is not None:
        have, indices = feature_dim(meta, key), getattr(config, "state_indices", None)
        if not (max(indices) < have if indices else have == state_dim):
            raise RecipeError(
                f"the dataset's {key!r} has {have} dims, not the state the model was trained on ({state_dim} dims"
                f"{f', indices up to {max(indices)}' if indices else ''}): evaluate on a dataset with the model's "
                "state, or set state_key"
            )


def main(args: list[str] | None = None) -> dict:
    data_args, cli = parse_args(args)
    episodes = parse_episodes(cli.episodes or data_args.eval_episodes)
    if not episodes:
        raise RecipeError("no episodes to evaluate: pass --episodes (e.g. 40:50) or set eval_episodes in the recipe")
    config = model_config(cli.model)
    meta = load_metadata(data_args)
    check_episodes(meta, "--episodes" if cli.episodes else "eval_episodes", episodes)
    check_model_fits_dataset(config, meta, data_args)
    out = Path(cli.output_dir) if cli.output_dir else default_output_dir(cli.model)

    model = AutoModel.from_pretrained(cli.model, config=config).to(cli.device).eval()
    processor = AutoProcessor.from_pretrained(cli.model)
    data_args.action_horizon = model.config.action_horizon  # compare whole predicted chunks
    data_args.state_indices = getattr(model.config, "state_indices", data_args.state_indices)  # the state it saw
    dataset = VLADataset(
        meta, data_args, list(model.config.camera_keys), episodes, frame_resize=frame_resize_for(model.config)
    )

    predictions = predict_open_loop(model, processor, dataset, cli.batch_size, cli.num_workers)
    results = open_loop_metrics(model, processor, predictions)
    dims = list(range(min(cli.plot_dims, predictions.predicted.shape[-1])))
    plots = plot_episodes(predictions, out / "plots", results["episodes"][: cli.plot_episodes], dims)

    path = update_eval_results(out, PREFIX, results)
    scalars = {PREFIX + k: v for k, v in results.items() if isinstance(v, float)}
    add_card_results(
        out, scalars, task=OPEN_LOOP_TASK, dataset=data_args.dataset_repo_id, section="Open-loop evaluation"
    )

    print(f"open-loop on {results['num_frames']} frames of episodes {cli.episodes or data_args.eval_episodes}:")
    print(f"  L1  {results['l1']:.4f}  per dim {[round(v, 4) for v in results['l1_per_dim']]}")
    print(f"  MSE {results['mse']:.5f}  per dim {[round(v, 5) for v in results['mse_per_dim']]}")
    if "action_token_accuracy" in results:
        print(f"  action-token accuracy {results['action_token_accuracy']:.3f} (chance 1/{model.config.n_action_bins})")
    if "baseline_mean_action_l1" in results:
        print(f"  (always predicting the mean training action: L1 {results['baseline_mean_action_l1']:.4f})")
    print(f"wrote {path}, {len(plots)} plots in {out / 'plots'}, metrics in {out / 'README.md'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except RecipeError as e:
        sys.exit(f"error: {e}")
