"""The recipe: model, data and training arguments, parsed from a YAML file and the command line.

``parse_recipe()`` reads ``--config recipe.yaml`` with TRL's ``TrlParser`` (the alignment-handbook
convention): the YAML sets the defaults, any field can be overridden on the command line
(CLI > YAML > default), and a key that no dataclass knows is an error that names it.
"""

from __future__ import annotations

import difflib
import enum
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml
from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

FinetuneMode = Literal["full", "lora", "qlora", "expert_only"]
ADAPTER_MODES = ("lora", "qlora")
# The normalisation modes a recipe may name. data/normalize.py implements them and ships inside saved models as
# remote code, so it cannot import this module, nor this module it (the argument layer sits below the data layer):
# tests/test_pipeline.py checks that both name the same modes.
NORM_MODES = ("bounds_q99", "quantiles", "mean_std", "min_max", "identity")
# Recipe keys renamed to TRL's ModelConfig names: a recipe with the old key fails naming the new one.
RENAMED_KEYS = {"bnb_4bit_use_double_quant": "use_bnb_nested_quant"}

logger = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A bad recipe value: the message names the key and the fix."""


@dataclass
class ModelArguments(ModelConfig):
    """Which model to fine-tune and how (full, LoRA, QLoRA, pi0.5 expert-only).

    TRL's ``ModelConfig`` with the fields a VLA recipe adds (``model_config``, ``finetune_mode``, ...) and the
    defaults OpenVLA's fine-tuning uses. ``finetune_mode`` is the one switch: it sets TRL's ``use_peft`` and
    ``load_in_4bit`` (``use_peft: true`` alone means LoRA, with ``load_in_4bit: true`` QLoRA), so that
    ``trl.get_peft_config`` / ``trl.get_quantization_config`` build the PEFT and bitsandbytes configs.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model: Hub id or local folder (e.g. openvla/openvla-7b)."}
    )
    dtype: str | None = field(
        default=None, metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto; default: the model's."}
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (OpenVLA: 32)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (OpenVLA: min(r, 16))."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names or 'all-linear'; default: the model's own choice (every used linear)."},
    )
    lora_task_type: str | None = field(
        default=None, metadata={"help": "PEFT task type; none: a plain PeftModel (a VLA is no causal LM head)."}
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "The model family this recipe is written for (openvla, pi05): a model_name_or_path of another "
            "family is refused instead of silently training it. Default: the family of whatever model is named."
        },
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Config fields of a randomly initialised model (a dict with `model_type`, or JSON on the CLI)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer for a `model_config` model; default: a local character-level tokenizer."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the model repo (off by default)."})
    finetune_mode: FinetuneMode = field(default="full", metadata={"help": "full, lora, qlora or expert_only (pi0.5)."})
    lora_init_weights: str = field(default="gaussian", metadata={"help": "PEFT init_lora_weights (OpenVLA: gaussian)."})
    merge_adapters: bool = field(
        default=False, metadata={"help": "LoRA/QLoRA: also write the merged model to <output_dir>/merged."}
    )

    def __post_init__(self) -> None:
        targets = self.lora_target_modules
        super().__post_init__()
        self.lora_target_modules = targets  # TRL makes a one-item list a string, which PEFT reads as a regex
        self._sync_finetune_mode()
        if isinstance(self.model_config, str):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as e:
                raise RecipeError(f"model_config must be a mapping (YAML) or JSON on the CLI: {e}") from e
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise RecipeError("set exactly one of model_name_or_path (pretrained) or model_config (random init)")
        if self.model_config is not None and "model_type" not in self.model_config:
            raise RecipeError("model_config needs a `model_type` key (openvla, openvla_oft or pi05)")
        if self.model_config is not None and self.model_type not in (None, self.model_config["model_type"]):
            raise RecipeError(
                f"model_type: {self.model_type!r} but model_config has model_type {self.model_config['model_type']!r}"
            )

    def _sync_finetune_mode(self) -> None:
        """``finetune_mode`` and TRL's ``use_peft`` / ``load_in_4bit`` say one thing: TRL's switches alone pick
        LoRA or QLoRA, and a contradiction fails naming both keys."""
        if self.load_in_8bit:
            raise RecipeError("load_in_8bit is not supported: use finetune_mode: qlora (4-bit) or lora")
        if self.finetune_mode == "full" and (self.use_peft or self.load_in_4bit):
            self.finetune_mode = "qlora" if self.load_in_4bit else "lora"
        if self.load_in_4bit and self.finetune_mode != "qlora":
            raise RecipeError(f"load_in_4bit: true needs finetune_mode: qlora, not {self.finetune_mode!r}")
        if self.use_peft and self.finetune_mode not in ADAPTER_MODES:
            raise RecipeError(f"use_peft: true needs finetune_mode: lora or qlora, not {self.finetune_mode!r}")
        self.use_peft = self.finetune_mode in ADAPTER_MODES
        self.load_in_4bit = self.finetune_mode == "qlora"


@dataclass
class DataArguments:
    """Which LeRobot dataset, which of its features, and how to cut it into samples."""

    dataset_repo_id: str = field(
        default=None, metadata={"help": "LeRobot dataset (v3.0) repo id, e.g. lerobot/libero_spatial_image."}
    )
    datasets: list[dict] | None = field(
        default=None,
        metadata={
            "help": "A weighted mixture instead of dataset_repo_id: a list of entries, each with dataset_repo_id and "
            "optionally name, weight (default 1), dataset_root, dataset_revision, camera_keys, state_key, "
            "action_key, state_indices, train_episodes, eval_episodes, tasks; other data keys are shared. Samples "
            "are drawn by weight; statistics are per dataset, saved under its name (predict_action's unnorm_key)."
        },
    )
    dataset_root: str | None = field(default=None, metadata={"help": "Local folder of the dataset (optional)."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Dataset revision (branch, tag, commit)."})
    camera_keys: list[str] | None = field(
        default=None, metadata={"help": "Camera features fed to the model; default: the dataset's first camera."}
    )
    state_key: str | None = field(default="observation.state", metadata={"help": "State feature (None: no state)."})
    state_indices: list[str] | None = field(
        default=None,
        metadata={
            "help": "The state dims the model sees, in this order: indices and ranges like '236:240' (e.g. the joints "
            "of a 256-dim proprioception vector; pi0.5 takes <= 32). Saved as config.state_indices; at inference pass "
            "the processor the selected state, observation.state[..., config.state_indices]. Default: every dim."
        },
    )
    action_key: str = field(default="action", metadata={"help": "Action feature."})
    action_horizon: int = field(default=1, metadata={"help": "Actions per sample (chunk length; OpenVLA: 1)."})
    train_episodes: list[str] | None = field(
        default=None, metadata={"help": "Episodes to train on: indices and ranges like '0:40'; default: all not eval."}
    )
    eval_episodes: list[str] | None = field(
        default=None, metadata={"help": "Held-out episodes for evaluation: indices and ranges like '40:50'."}
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train and evaluate only on the episodes of these tasks: exact task strings, or 're:<regex>' "
            "(matched against the whole task); combined with train_episodes / eval_episodes. Default: every task."
        },
    )
    relative_actions: bool = field(
        default=False,
        metadata={
            "help": "Train on actions relative to the current state (openpi's DeltaActions, LeRobot's "
            "use_relative_actions): action dim i minus state dim i (the state after state_indices) on the dims of "
            "relative_action_mask; statistics are those of the relative actions; predict_action adds the state back."
        },
    )
    relative_action_mask: list[bool] | None = field(
        default=None,
        metadata={
            "help": "Per action dim, relative (true) or absolute; dims past the list stay absolute. Default: all but "
            "the last (the gripper), openpi's make_bool_mask(n - 1, -1)."
        },
    )
    norm_mode: str | None = field(
        default=None,
        metadata={"help": f"One of {', '.join(NORM_MODES)}; default: the model's (OpenVLA bounds_q99)."},
    )
    action_norm_mask: list[bool] | None = field(
        default=None,
        metadata={"help": "Per action dim, normalise or not; default (OpenVLA): all but the last (the gripper)."},
    )
    image_augmentation: bool = field(
        default=False, metadata={"help": "OpenVLA's augmentation: random crop (90% area) + colour jitter."}
    )
    video_backend: str = field(default="pyav", metadata={"help": "LeRobot video backend: pyav or torchcodec."})
    norm_stats_path: str | None = field(
        default=None,
        metadata={
            "help": "Normalise with these statistics instead of the dataset's (e.g. a base model's, to fine-tune on a "
            "small dataset): a LeRobot meta/stats.json, an OpenVLA dataset_statistics.json or a model's config.json. "
            "Features it lacks come from the dataset."
        },
    )
    norm_stats_key: str | None = field(
        default=None,
        metadata={"help": "The dataset entry of a norm_stats_path that holds several (OpenVLA: e.g. bridge_orig)."},
    )
    stats_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of the statistics computed from the dataset's parquet data (when its meta/stats.json "
            "lacks what norm_mode needs, or for a subset of episodes); default $VLA_RECIPES_CACHE/stats, else "
            "~/.cache/vla_recipes/stats."
        },
    )
    write_stats_to_dataset: bool = field(
        default=False,
        metadata={
            "help": "Also write the computed statistics into the dataset's meta/stats.json (the dataset is never "
            "modified otherwise). Refused when training on a subset of episodes."
        },
    )
    frame_cache: bool = field(
        default=True,
        metadata={
            "help": "Decode each video once into a uint8 frame cache at the model's input size (memory-mapped) "
            "instead of per sample; false: LeRobot's per-sample decoding."
        },
    )
    frame_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Frame cache folder; default: $VLA_RECIPES_CACHE/frames, else ~/.cache/vla_recipes/frames."},
    )

    def __post_init__(self) -> None:
        if self.datasets is not None:
            check_mixture_recipe(self)
        elif self.dataset_repo_id is None:
            raise RecipeError(
                "dataset_repo_id is required (a LeRobot dataset repo id; dataset_root for a local copy), or datasets "
                "for a mixture"
            )
        if self.camera_keys is not None and not self.camera_keys:
            raise RecipeError(
                "camera_keys is empty: list the cameras the model sees (e.g. [observation.images.image]), or drop "
                "the key for the dataset's first camera"
            )
        if self.camera_keys is not None and len(set(self.camera_keys)) < len(self.camera_keys):
            raise RecipeError(f"camera_keys lists a camera twice: {self.camera_keys}")
        if self.action_horizon < 1:
            raise RecipeError(f"action_horizon must be >= 1, got {self.action_horizon}")
        if self.tasks is not None and not self.tasks:
            raise RecipeError("tasks is empty: list the tasks to train on, or drop the key for every task")
        if self.norm_mode is not None and self.norm_mode not in NORM_MODES:
            raise RecipeError(f"norm_mode={self.norm_mode!r} is not one of {', '.join(NORM_MODES)}")


# The keys a mixture entry may set; all other data keys are shared by the entries.
ENTRY_KEYS = (
    "dataset_repo_id", "dataset_root", "dataset_revision", "camera_keys", "state_key", "action_key", "state_indices",
    "train_episodes", "eval_episodes", "tasks",
)  # fmt: skip


def check_mixture_recipe(data_args: DataArguments) -> None:
    """The recipe-level checks of ``datasets`` (no dataset is read): one line naming the entry and the key."""
    if data_args.dataset_repo_id is not None:
        raise RecipeError("give either dataset_repo_id (one dataset) or datasets (a mixture), not both")
    if not data_args.datasets:
        raise RecipeError("datasets is empty: list the mixture's entries, or give dataset_repo_id for one dataset")
    seen: set[str] = set()
    for i, entry in enumerate(data_args.datasets):
        if not isinstance(entry, dict) or not entry.get("dataset_repo_id"):
            raise RecipeError(f"datasets[{i}] needs a dataset_repo_id (a mapping: dataset_repo_id, weight, ...)")
        if unknown := sorted(set(entry) - {*ENTRY_KEYS, "name", "weight"}):
            raise RecipeError(
                f"datasets[{i}] ({entry['dataset_repo_id']}): {', '.join(unknown)} cannot be set per dataset; an entry "
                f"takes name, weight, {', '.join(ENTRY_KEYS)} (other keys are the recipe's, shared)"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise RecipeError(
                f"datasets[{i}] ({entry['dataset_repo_id']}): weight must be a number > 0, got {weight!r}"
            )
        name = str(entry.get("name", entry["dataset_repo_id"]))
        if name in seen:
            raise RecipeError(
                f"datasets[{i}]: the name {name!r} is taken by an earlier entry; give each entry its own name "
                "(its statistics are saved under it)"
            )
        seen.add(name)


@dataclass
class VLATrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with the defaults a VLA fine-tune needs."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Where checkpoints and the final model go."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every collated field (the model needs pixel_values etc.)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    report_to: str | list[str] = field(default="none", metadata={"help": "tensorboard, wandb, ... or none."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a non-empty output_dir: its previous content (checkpoints included) is deleted before "
            "training, unless this run resumes one of its checkpoints."
        },
    )
    resume_allow_changes: bool = field(
        default=False,
        metadata={
            "help": "Resume although the batch size, gradient accumulation, number of processes, seed or training data "
            "differ from the checkpoint's recipe (the run then no longer equals an uninterrupted one)."
        },
    )

    def __post_init__(self) -> None:
        # YAML `resume_from_checkpoint: true` is a bool, `--resume_from_checkpoint true` a string: same meaning.
        resume = self.resume_from_checkpoint
        if isinstance(resume, str) and resume.lower() in ("true", "false"):
            self.resume_from_checkpoint = True if resume.lower() == "true" else None
        self._check_schedule()
        super().__post_init__()

    def _check_schedule(self) -> None:
        """Values transformers accepts but trains wrongly with (``max_steps: 0`` runs one step at lr 0 and saves an
        untrained model; ``save_steps: 0`` saves no checkpoint) or fails on deep inside the trainer with a traceback
        (a zero batch size, ``ZeroDivisionError`` for zero accumulation steps, a negative learning rate)."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            what = "trains nothing" if self.max_steps == 0 else "is not a number of steps"
            raise RecipeError(f"max_steps={self.max_steps} {what}: set max_steps >= 1, or -1 to train num_train_epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise RecipeError(f"num_train_epochs={self.num_train_epochs} trains nothing: set it > 0 (or max_steps)")
        if self.save_strategy == "steps" and self.save_steps <= 0:
            raise RecipeError(
                f"save_steps={self.save_steps} with save_strategy: steps saves no checkpoint: set save_steps >= 1 "
                '(or a fraction of the run in (0, 1)), or save_strategy: "no"'
            )
        if self.learning_rate < 0:
            raise RecipeError(f"learning_rate={self.learning_rate} is negative: gradient ascent; give it > 0")
        if self.learning_rate == 0:
            logger.warning("learning_rate is 0: the weights will not change; the saved model is the one loaded")


# The lock file a run holds in its output_dir (see ``output_dir.OutputDirLock``). A leading "_" keeps it out of
# Hub pushes (transformers' ``ignore_patterns``) and it does not make a folder count as non-empty.
RUN_LOCK_NAME = "_run.lock"


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (symlinks and ``..`` resolved)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_output_dir(args: VLATrainingArguments) -> None:
    """Refuse to write over a previous run's folder unless asked to.

    A non-empty ``output_dir`` is taken only to continue the run it holds (``resume_from_checkpoint: true`` or a
    checkpoint inside it) or with ``overwrite_output_dir: true``. Resuming a checkpoint that lives elsewhere writes
    a new run into ``output_dir``, so it needs an empty folder or ``overwrite_output_dir`` like any new run.
    """
    out = Path(args.output_dir)
    if not out.is_dir() or args.overwrite_output_dir:
        return
    if not any(entry.name != RUN_LOCK_NAME for entry in out.iterdir()):
        return
    resume = args.resume_from_checkpoint
    if resume is True or (isinstance(resume, str) and inside(resume, out)):
        return
    if resume:
        raise RecipeError(
            f"output_dir {str(out)!r} holds another run and resume_from_checkpoint {resume!r} is not one of its "
            "checkpoints: resuming it here would overwrite that run; choose an empty output_dir, or set "
            "overwrite_output_dir: true to replace it"
        )
    raise RecipeError(
        f"output_dir {str(out)!r} exists and is not empty; set overwrite_output_dir: true to replace it "
        "or resume_from_checkpoint: true to continue it"
    )


def parse_episodes(spec: Sequence[str | int] | str | None, what: str = "episode spec") -> list[int] | None:
    """``['0:3', 5]`` or ``'0:3,5'`` -> ``[0, 1, 2, 5]`` (Python-style half-open ranges, in the order given);
    ``what`` names the spec in the error (episodes, or ``state_indices``)."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else spec
    episodes: list[int] = []
    for item in items:
        text = str(item).strip()
        try:
            if ":" in text:
                start, stop = text.split(":")
                episodes.extend(range(int(start), int(stop)))
            elif text:
                episodes.append(int(text))
        except ValueError as e:
            raise RecipeError(f"{what} {text!r} is not an index or a 'start:stop' range") from e
    return episodes


RECIPE_DATACLASSES = (ModelArguments, DataArguments, VLATrainingArguments)


def _key_hint(name: str, close: list[str]) -> str:
    if name in RENAMED_KEYS:
        return f" (renamed {RENAMED_KEYS[name]!r}, TRL's ModelConfig name)"
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key_error(unknown: list[str], source: str) -> RecipeError:
    names = [s[2:] for s in unknown if s.startswith("--")] or unknown
    known = [f.name for cls in RECIPE_DATACLASSES for f in fields(cls)]
    hints = {n: difflib.get_close_matches(n.replace("-", "_"), known, n=1) for n in names}
    described = ", ".join(f"{n!r}{_key_hint(n, h)}" for n, h in hints.items())
    return RecipeError(f"unknown recipe key in {source}: {described}")


# Values a field takes besides its declared type: ``resume_from_checkpoint: true`` (the latest checkpoint),
# ``lora_target_modules: all-linear`` (PEFT's keyword), ``train_episodes: "0:40,45"``.
_ALSO_ACCEPTED = {
    "resume_from_checkpoint": bool,
    "lora_target_modules": str,
    "train_episodes": str,
    "eval_episodes": str,
    "state_indices": str,
}


def _type_ok(value: object, tp: object) -> bool:
    """Whether a YAML value fits a field's type. Strings for numbers and booleans are left to argparse, which
    converts them (``learning_rate: 1e-4`` is a string to YAML) and reports the ones it cannot."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in args)
    if value is None:  # an unset value: each dataclass says whether it needs one
        return True
    if tp is type(None):
        return False
    if origin is Literal:
        return value in args or isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple):
        # a number among strings is fine: it is read as text (train_episodes: ["0:3", 5])
        return isinstance(value, list) and all(_type_ok(v, args[0]) or isinstance(v, int) for v in value if args)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool | str)
    if tp in (int, float):
        return isinstance(value, str) or (
            isinstance(value, int | float) and not isinstance(value, bool) and (tp is float or isinstance(value, int))
        )
    if tp is str or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return isinstance(value, str)
    return True  # other types: argparse converts or the dataclass checks


def _type_name(tp: object) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, args))
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def check_yaml_types(recipe: dict, source: str) -> None:
    """A recipe value of the wrong type fails naming the key (argparse would keep a YAML value unchecked)."""
    for cls in RECIPE_DATACLASSES:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in recipe or not f.init:
                continue
            value, tp = recipe[f.name], hints.get(f.name, f.type)
            if _type_ok(value, tp) or isinstance(value, _ALSO_ACCEPTED.get(f.name, ())):
                continue
            hint = ""
            if isinstance(value, bool):
                hint = "; YAML reads a bare yes/no/on/off/true/false as a boolean: quote the value"
            elif isinstance(value, str) and _type_ok([value], tp):
                hint = f"; write a list: {f.name}: [{value}]"
            raise RecipeError(
                f"{f.name} in {source} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}"
            )


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(
                    f"recipe file {self.name!r}: {key!r} is given twice (lines {seen[key]} and {line}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_recipe_yaml(path: str | Path) -> dict:
    """A recipe file as a mapping: one line naming the file for an unreadable file, invalid YAML, a key given
    twice or a document that is not a mapping."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {e.strerror}") from e
    loader = _NoDuplicateKeysLoader(text)
    loader.name = str(path)
    try:
        recipe = loader.get_single_data()
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from e
    finally:
        loader.dispose()
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe file {str(path)!r} must be a mapping of recipe keys to values")
    return recipe


def _join_negative_values(args: list[str]) -> list[str]:
    """``--learning_rate -1e-3`` -> ``--learning_rate=-1e-3``: argparse reads a negative number in exponent form as
    an option and reports "expected one argument"; joined, the value reaches the recipe's own checks."""
    out: list[str] = []
    for arg in args:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _RecipeParser(TrlParser):
    """TrlParser whose argparse errors (``--max_steps ten``) are one RecipeError line, not a usage screen."""

    def error(self, message: str) -> typing.NoReturn:
        raise RecipeError(f"bad recipe value: {message}")


def parse_recipe(
    args: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, VLATrainingArguments]:
    """Parse ``--config recipe.yaml`` plus CLI overrides into the three argument dataclasses."""
    args = _join_negative_values(list(sys.argv[1:] if args is None else args))
    if "--config" in args:
        path = args[args.index("--config") + 1]
        check_yaml_types(load_recipe_yaml(path), f"recipe file {path!r}")
    parser = _RecipeParser(RECIPE_DATACLASSES, allow_abbrev=False)  # a typo must not pass as a prefix
    *parsed, from_yaml, from_cli = parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    if from_yaml:
        raise _unknown_key_error(from_yaml, "the recipe YAML")
    if from_cli:
        raise _unknown_key_error(from_cli, "the command line")
    return tuple(parsed)
