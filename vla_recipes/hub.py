"""The output folder a user (or the Hub) gets: weights, processor, config with norm stats, card.

For LoRA/QLoRA runs the folder holds the adapter plus a ``config.json`` carrying the fine-tune's
norm stats; ``AutoModel.from_pretrained(folder)`` loads the base named in ``adapter_config.json``
with that config and applies the adapter. That name is made portable at save: a Hub id stays one, a
random-init base saved inside the folder is ``./base_model``, another local base an absolute path.
``merge_adapters: true`` also writes a merged, standalone model to ``<output_dir>/merged``.

``push_to_hub`` / ``hub_model_id`` / ``hub_private_repo`` / ``hub_strategy`` are transformers'
TrainingArguments and behave as there (the Trainer creates the repo and pushes checkpoints); the
last commit is this output folder with our model card. ``check_push_to_hub`` makes a push that
could not happen fail before training, and keeps the token out of everything that is saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vla_recipes.checkpointing import write_recipe
from vla_recipes.configs import RecipeError
from vla_recipes.data.stats import action_stats_markdown
from vla_recipes.families import get_family
from vla_recipes.main_process import on_main_process
from vla_recipes.models.adapters import record_portable_base
from vla_recipes.remote_code import write_remote_code

USAGE = """\
```python
import vla_recipes  # registers the model with the Auto classes
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")
inputs = processor(images=[{images}], text=["{task}"]{state})  # batched: one entry per sample
actions = model.predict_action(**inputs)  # (batch, {horizon}, {action_dim}) in the dataset's units
```
"""

OFFLINE = "push_to_hub: HF_HUB_OFFLINE is set; unset it to push, or set push_to_hub: false"
TRAINING_EVAL_TASK = "open-loop action prediction"  # the held-out loss is open-loop, as evaluation.OPEN_LOOP_TASK
NOT_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def _hub_error(e: Exception) -> RecipeError | None:
    """A one-line RecipeError for a Hub answer that means the token cannot push; None for anything else."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return RecipeError(OFFLINE)
    if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code == 401:
        return RecipeError(
            "push_to_hub: the Hub rejected the token (401); create a write token at "
            "https://huggingface.co/settings/tokens and run `hf auth login` or set HF_TOKEN"
        )
    if isinstance(e, OSError) or type(e).__module__.startswith("httpx"):  # connection refused, DNS, timeout
        return RecipeError(
            f"push_to_hub: the Hub at {constants.ENDPOINT} cannot be reached ({type(e).__name__}); "
            "check the network (or HF_ENDPOINT), or set push_to_hub: false"
        )
    return None


def check_push_to_hub(args) -> None:
    """Fail before any training when the pushes ``push_to_hub`` asks for could not happen.

    Checks the repo id, that a token exists, that the Hub accepts it and that it may write there. A token given
    as ``hub_token`` is then moved into this process's ``HF_TOKEN`` (where huggingface_hub reads it) so it is in
    no saved ``training_args.bin``, checkpoint or log.
    """
    if not args.push_to_hub:
        return
    on_main_process(_check_hub_access, args)  # one whoami call per run, not one per rank (the Hub rate-limits)
    if args.hub_token is not None:
        os.environ["HF_TOKEN"], args.hub_token = args.hub_token, None


def _check_hub_access(args) -> None:
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = args.hub_model_id or Path(args.output_dir).absolute().name
    source = "hub_model_id" if args.hub_model_id else "hub_model_id (unset: the output_dir's name)"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise RecipeError(
            f"{source}={repo_id!r} is not a Hub repo id; use 'name' or 'namespace/name' with letters, digits, "
            "'-', '_' and '.' (no '--' or '..', at most 96 characters)"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise RecipeError(OFFLINE)
    token = args.hub_token or get_token()
    if token is None:
        raise RecipeError(
            "push_to_hub needs a Hub token with write access: run `hf auth login`, set HF_TOKEN, or set hub_token"
        )
    try:
        whoami = HfApi().whoami(token=token)
    except Exception as e:
        if (error := _hub_error(e)) is None:
            raise
        raise error from None
    access = whoami.get("auth", {}).get("accessToken", {})
    user, orgs = whoami.get("name"), [org.get("name") for org in whoami.get("orgs", [])]
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    if access.get("role") == "read" or (
        access.get("role") == "fineGrained" and "repo.write" not in json.dumps(access.get("fineGrained", {}))
    ):
        raise RecipeError(
            f"push_to_hub: the token of {user!r} is read-only; create a write token at "
            "https://huggingface.co/settings/tokens and run `hf auth login` or set HF_TOKEN"
        )
    if namespace not in (user, *orgs):
        raise RecipeError(
            f"hub_model_id={repo_id!r}: {user!r} cannot create repos under {namespace!r}; "
            f"use one of {[user, *orgs]} as the namespace"
        )


def _base_model(model) -> str | None:
    base = getattr(model, "get_base_model", lambda: model)()
    path = base.config.name_or_path
    return path if path and not Path(path).is_dir() else None


def _image_names(camera_keys: list[str]) -> str:
    """One image per sample for one camera, a list per sample for several (named after the cameras)."""
    names = [key.rsplit(".", 1)[-1] for key in camera_keys]
    return names[0] if len(names) == 1 else f"[{', '.join(names)}]"


def model_card(trainer, model_args) -> str:
    """A model card with Hub metadata (base model, dataset, robotics tags, eval metrics) and usage."""
    args, config = trainer.args, trainer.model.config
    mixture = (getattr(trainer, "recipe", None) or {}).get("datasets")  # its norm_stats are keyed by entry name
    datasets = sorted({e["dataset_repo_id"] for e in mixture}) if mixture else sorted(config.norm_stats or {})
    last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
    eval_metrics = {
        k: v for k, v in last_eval.items() if k.startswith("eval_") and k not in NOT_METRICS and isinstance(v, float)
    }
    train_loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    base = _base_model(trainer.model)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="robotics",
        tags=["vla-recipes", "robotics", "lerobot", config.model_type, model_args.finetune_mode],
        datasets=datasets,
        base_model=base,
        model_name=(args.hub_model_id or Path(args.output_dir).name).split("/")[-1] if eval_metrics else None,
        eval_results=[
            _eval_result(TRAINING_EVAL_TASK, datasets[0], k.removeprefix("eval_"), v) for k, v in eval_metrics.items()
        ]
        or None,
    )
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
        **({"state_indices": config.state_indices} if getattr(config, "state_indices", None) else {}),
    }
    lines = [
        f"# {Path(args.output_dir).name}\n",
        f"A {config.model_type} policy fine-tuned with [vla-recipes](https://github.com/vla-recipes) "
        f"({model_args.finetune_mode}) on {', '.join(datasets)}"
        + (f", from [{base}](https://huggingface.co/{base})" if base else "")
        + (
            ".\n"
            if not hasattr(trainer.model, "get_base_model")
            else ". This repo holds the LoRA adapter; "
            "`AutoModel.from_pretrained` loads the base model named in `adapter_config.json` and merges it in.\n"
        ),
        "## Usage\n",
        USAGE.format(
            repo=args.hub_model_id or args.output_dir,
            task="pick up the bowl",
            images=_image_names(config.camera_keys),
            state=", state=state  # (batch, state_dim)" if get_family(config.model_type).takes_state(config) else "",
            horizon=config.action_horizon,
            action_dim=config.action_dim,
        ),
        "## Training\n",
        "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```\n",
        "The full recipe (every argument) is in `recipe.json`; the normalisation statistics used in training are in "
        "`config.json` (`norm_stats`) and `predict_action` un-normalises with them.\n",
        action_stats_markdown(config.norm_stats),
    ]
    if train_loss:
        lines.append(f"Training loss: {train_loss[0]:.4f} (first log) -> {train_loss[-1]:.4f} (last log).\n")
    if eval_metrics:
        lines.append("## Evaluation\n\n" + "\n".join(f"- {k}: {v:.4f}" for k, v in eval_metrics.items()) + "\n")
    return _card(data, "\n".join(lines)).content


def _card(data: ModelCardData, body: str) -> ModelCard:
    """A card as huggingface_hub writes one: its metadata (``model-index`` built from ``eval_results``), then text."""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _eval_result(task: str, dataset: str, metric: str, value: float) -> EvalResult:
    return EvalResult(
        task_type="robotics", task_name=task, dataset_type=dataset, dataset_name=dataset, metric_type=metric,
        metric_value=value,
    )  # fmt: skip


def save_for_inference(trainer, model_args) -> None:
    """Write the final model, processor, config (with norm stats) and model card to ``output_dir``."""
    out = Path(trainer.args.output_dir)
    # _internal_call: no push of transformers' own draft card here; push_output_dir pushes ours below
    trainer.save_model(str(out), _internal_call=True)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):  # PEFT: keep the fine-tune's config (norm stats) beside the adapter
        model.get_base_model().config.save_pretrained(out)
        record_portable_base(out)  # a Hub id, ./base_model inside the folder, or an absolute local path
        if model_args.merge_adapters:
            merged = model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            trainer.processing_class.save_pretrained(out / "merged")
            write_remote_code(out / "merged", merged.config.model_type)
    write_remote_code(out, model.config.model_type)  # trust_remote_code=True loads the folder without vla_recipes
    (out / "README.md").write_text(model_card(trainer, model_args))
    # every argument of the three groups (checkpointing.run_recipe), as each checkpoint records it
    write_recipe(out, getattr(trainer, "recipe", None) or trainer.args.to_dict() | vars(model_args))
    if trainer.args.push_to_hub:
        push_output_dir(trainer)


def push_output_dir(trainer) -> None:
    """The final commit, as ``Trainer.push_to_hub`` makes it but with our model card: the whole output folder
    except local checkpoints (``hub_strategy: checkpoint`` pushes the last one as ``last-checkpoint/``)."""
    from huggingface_hub import upload_folder
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if (push := getattr(trainer, "push_in_progress", None)) is not None:  # a checkpoint push still running goes first
        push.wait_until_done()
    upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=trainer.args.output_dir,
        commit_message="End of training",
        token=trainer.args.hub_token,
        ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"],
        revision=trainer.args.hub_revision,
    )


def add_card_results(folder: str | Path, metrics: dict[str, float], *, task: str, dataset: str, section: str) -> None:
    """Record evaluation results in ``folder/README.md``: one ``model-index`` entry per metric (a re-run replaces
    the earlier value of that metric for that task and dataset) and a ``## <section>`` list (replaced too).

    Used by ``recipes/evaluate.py`` and ``recipes/rollout.py`` after training wrote the card (a folder without
    one gets a minimal card).
    """
    import re

    path = Path(folder) / "README.md"
    card = ModelCard.load(path) if path.is_file() else _card(ModelCardData(), f"# {Path(folder).name}\n")
    card.data.model_name = card.data.model_name or Path(folder).resolve().name
    results = [
        r
        for r in card.data.eval_results or []
        if (r.task_name, r.dataset_type, r.metric_type) not in {(task, dataset, name) for name in metrics}
    ]
    results += [_eval_result(task, dataset, name, value) for name, value in metrics.items()]
    card.data.eval_results = results
    block = f"## {section}\n\n" + "".join(f"- {name}: {value:.4g}\n" for name, value in metrics.items()) + "\n"
    text, count = re.subn(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", lambda _: block, card.text, flags=re.M | re.S)
    card.text = text if count else card.text.rstrip("\n") + "\n\n" + block
    card.save(path)
