"""Open-loop evaluation of a saved policy on held-out episodes of its LeRobot dataset.

    python recipes/evaluate.py --model outputs/demo-openvla --config recipes/demo/openvla.yaml

Reloads the model and processor with ``AutoModel`` / ``AutoProcessor``, predicts every frame's
action chunk with batched ``predict_action`` and compares it with the recorded actions in the
dataset's units: per-dimension and mean L1 / MSE (steps padded past an episode's end excluded).
The episodes are the recipe's ``eval_episodes`` (or ``--episodes``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoProcessor

from vla_recipes.configs import DataArguments, RecipeError, parse_episodes
from vla_recipes.data.lerobot import VLADataset, check_episodes, load_metadata
from vla_recipes.data.normalize import select_stats
from vla_recipes.families import get_family


def evaluate(model_path: str, data_args: DataArguments, episodes: list[int], batch_size: int = 16) -> dict:
    model = AutoModel.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    family = get_family(model.config.model_type)
    meta = load_metadata(data_args)
    check_episodes(meta, "episodes", episodes)
    dataset = VLADataset(meta, data_args, model.config.camera_keys, episodes)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=list)
    errors, targets, masks = [], [], []
    with torch.no_grad():
        for samples in loader:
            predicted = model.predict_action(**family.inference_inputs(processor, samples))
            target = torch.stack([s["actions"] for s in samples])
            errors.append(predicted.float() - target.float())
            targets.append(target.float())
            masks.append(~torch.stack([s["action_is_pad"] for s in samples]))
    error, mask = torch.cat(errors), torch.cat(masks)
    valid = error[mask]  # (N, action_dim): every predicted step that has a recorded action
    l1, mse = valid.abs().mean(0), valid.pow(2).mean(0)
    # Reference point: always predicting the training set's mean action.
    mean_action = torch.tensor(select_stats(model.config.norm_stats, None)["action"]["mean"])
    targets = torch.cat(targets)[mask]
    return {
        "baseline_mean_action_l1": (targets - mean_action).abs().mean().item(),
        "num_samples": len(dataset),
        "episodes": episodes,
        "l1": l1.mean().item(),
        "mse": mse.mean().item(),
        "l1_per_dim": l1.tolist(),
        "mse_per_dim": mse.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Output folder or Hub id of a fine-tuned model.")
    parser.add_argument("--config", required=True, help="The recipe YAML (its dataset keys are used).")
    parser.add_argument("--episodes", default=None, help="Episodes to evaluate, e.g. '20:24' (default: eval_episodes).")
    parser.add_argument("--dataset_root", default=None, help="Override the recipe's dataset_root.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--output", default=None, help="JSON file for the results (default: <model>/open_loop_eval.json)."
    )
    cli = parser.parse_args()

    recipe = yaml.safe_load(Path(cli.config).read_text())
    data_args = DataArguments(**{f.name: recipe[f.name] for f in fields(DataArguments) if f.name in recipe})
    data_args.dataset_root = cli.dataset_root or data_args.dataset_root
    episodes = parse_episodes(cli.episodes or data_args.eval_episodes)
    if not episodes:
        raise RecipeError("no episodes to evaluate: set eval_episodes in the recipe or pass --episodes")
    results = evaluate(cli.model, data_args, episodes, cli.batch_size)
    print(f"open-loop on {results['num_samples']} frames of episodes {cli.episodes or data_args.eval_episodes}:")
    print(f"  L1  {results['l1']:.4f}  per dim {[round(v, 4) for v in results['l1_per_dim']]}")
    print(f"  MSE {results['mse']:.5f}  per dim {[round(v, 5) for v in results['mse_per_dim']]}")
    print(f"  (always predicting the mean training action: L1 {results['baseline_mean_action_l1']:.4f})")
    output = Path(cli.output) if cli.output else Path(cli.model) / "open_loop_eval.json"
    if output.parent.is_dir():
        output.write_text(json.dumps(results, indent=2))
        print(f"wrote {output}")


if __name__ == "__main__":
    try:
        main()
    except RecipeError as e:
        sys.exit(f"error: {e}")
