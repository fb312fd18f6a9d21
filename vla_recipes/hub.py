"""The output folder a user (or the Hub) gets: weights, processor, config with norm stats, card.

For LoRA/QLoRA runs the folder holds the adapter plus a ``config.json`` carrying the fine-tune's
norm stats; ``AutoModel.from_pretrained(folder)`` loads the base named in ``adapter_config.json``
with that config and applies the adapter. ``merge_adapters: true`` also writes a merged, standalone
model to ``<output_dir>/merged``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

USAGE = """\
```python
import vla_recipes  # registers the model with the Auto classes
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")
inputs = processor(images=[image], text=["{task}"])  # one image per sample, batched
actions = model.predict_action(**inputs)  # (batch, {horizon}, {action_dim}) in the dataset's units
```
"""


def _base_model(model) -> str | None:
    base = getattr(model, "get_base_model", lambda: model)()
    path = base.config._name_or_path
    return path if path and not Path(path).is_dir() else None


def model_card(trainer, model_args) -> str:
    """A model card with Hub metadata (base model, dataset, robotics tags, eval metrics) and usage."""
    args, config = trainer.args, trainer.model.config
    datasets = sorted(config.norm_stats or {})
    eval_metrics = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
    train_loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "robotics",
        "tags": ["vla-recipes", "robotics", "lerobot", config.model_type, model_args.finetune_mode],
        "datasets": datasets,
    }
    if (base := _base_model(trainer.model)) is not None:
        metadata["base_model"] = base
    if eval_metrics:
        metadata["model-index"] = [
            {
                "name": Path(args.output_dir).name,
                "results": [
                    {
                        "task": {"type": "robotics", "name": "open-loop action prediction"},
                        "dataset": {"type": datasets[0], "name": datasets[0]},
                        "metrics": [
                            {"type": k.removeprefix("eval_"), "value": v}
                            for k, v in eval_metrics.items()
                            if k.startswith("eval_") and isinstance(v, float)
                        ],
                    }
                ],
            }
        ]
    recipe = {
        "finetune_mode": model_args.finetune_mode,
        "model": model_args.model_name_or_path or "random init from model_config",
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_steps": trainer.state.max_steps,
        "action_horizon": config.action_horizon,
        "camera_keys": config.camera_keys,
        "norm_mode": config.norm_mode,
    }
    lines = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n",
        f"# {Path(args.output_dir).name}\n",
        f"A {config.model_type} policy fine-tuned with [vla-recipes](https://github.com/vla-recipes) "
        f"({model_args.finetune_mode}) on {', '.join(datasets)}.\n",
        "## Usage\n",
        USAGE.format(
            repo=args.hub_model_id or args.output_dir,
            task="pick up the bowl",
            horizon=config.action_horizon,
            action_dim=config.action_dim,
        ),
        "## Training\n",
        "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```\n",
    ]
    if train_loss:
        lines.append(f"Training loss: {train_loss[0]:.4f} (first log) -> {train_loss[-1]:.4f} (last log).\n")
    if eval_metrics:
        lines.append(
            "## Evaluation\n\n"
            + "\n".join(f"- {k}: {v:.4f}" for k, v in eval_metrics.items() if isinstance(v, float))
            + "\n"
        )
    return "\n".join(lines)


def save_for_inference(trainer, model_args) -> None:
    """Write the final model, processor, config (with norm stats) and model card to ``output_dir``."""
    out = Path(trainer.args.output_dir)
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):  # PEFT: keep the fine-tune's config (norm stats) beside the adapter
        model.get_base_model().config.save_pretrained(out)
        if model_args.merge_adapters:
            merged = model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            trainer.processing_class.save_pretrained(out / "merged")
    (out / "README.md").write_text(model_card(trainer, model_args))
    (out / "recipe.json").write_text(json.dumps(trainer.args.to_dict() | vars(model_args), indent=2, default=str))
