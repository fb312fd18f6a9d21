"""Loading a model for fine-tuning and applying the recipe's mode: full, LoRA, QLoRA, expert-only.

A ``model_config`` (random init) and a pretrained ``model_name_or_path`` take the same path: a random model is
first written to ``<output_dir>/base_model`` (by the main process) when adapters need a base to point to, then
everything loads through ``from_pretrained`` (so QLoRA quantises a random model exactly as it quantises
openvla/openvla-7b). A Hub model is downloaded by the main process before the other ranks read it from the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import CONFIG_MAPPING, AutoConfig, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME, cached_file

from vla_recipes.configs import ADAPTER_MODES, ModelArguments, RecipeError
from vla_recipes.families import families, lerobot_policy_types
from vla_recipes.main_process import main_process_first
from vla_recipes.models.adapters import AdapterBaseMismatchError


def load_config(model_args: ModelArguments) -> PretrainedConfig:
    """The model's config, read without loading weights: from ``model_config``, a transformers folder, or a
    LeRobot policy folder (a ``"type"`` in a family's ``lerobot_policy_types``, as lerobot/pi05_base is laid out), which
    AutoConfig cannot read."""
    if model_args.model_config is not None:
        model_type = model_args.model_config["model_type"]
        if model_type not in CONFIG_MAPPING:
            *others, last = sorted(families())
            raise RecipeError(
                f"model_config: model_type {model_type!r} is not known; use {', '.join(others)} or {last}"
            )
        try:
            return AutoConfig.for_model(**model_args.model_config)
        except (ValueError, TypeError) as e:  # the config class's own checks
            name = CONFIG_MAPPING[model_type].__name__
            message = " ".join(str(e).split()).removeprefix(f"{name}: ")
            raise RecipeError(f"model_config: {name}: {message}") from None
    path = model_args.model_name_or_path
    revision = model_args.model_revision
    config_file = cached_file(path, CONFIG_NAME, revision=revision, _raise_exceptions_for_missing_entries=False)
    if config_file is None:
        raise RecipeError(f"model_name_or_path={path!r} has no {CONFIG_NAME}: not a model folder or Hub model id")
    raw = json.loads(Path(config_file).read_text())
    if "model_type" not in raw and raw.get("type") in (lerobot_types := lerobot_policy_types()):
        return lerobot_types[raw["type"]].from_pretrained(path, revision=revision)
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=model_args.trust_remote_code)


def check_finetune_mode(model_args: ModelArguments, supported_modes: tuple[str, ...]) -> None:
    """Fail before any weight is loaded when the mode cannot run here."""
    mode = model_args.finetune_mode
    if mode not in supported_modes:
        raise RecipeError(f"finetune_mode={mode!r} is not available for this model; use one of {supported_modes}")
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("finetune_mode='qlora' needs bitsandbytes: pip install 'bitsandbytes>=0.46'")


def check_model_type(model_args: ModelArguments, config: PretrainedConfig) -> None:
    """A recipe written for one family (``model_type``) refuses a model of another, e.g. a pi0.5 adapter folder
    given to an OpenVLA recipe, which would otherwise train pi0.5 with OpenVLA's settings."""
    if model_args.model_type is not None and config.model_type != model_args.model_type:
        raise RecipeError(
            f"model_name_or_path={model_args.model_name_or_path!r} is a {config.model_type} model (its config.json), "
            f"but this recipe is for {model_args.model_type} (model_type: {model_args.model_type}); use a "
            f"{config.model_type} recipe, or a {model_args.model_type} model"
        )


def check_lora_targets(
    model_args: ModelArguments, config: PretrainedConfig, model_class: type[PreTrainedModel]
) -> None:
    """``lora_target_modules`` must name modules of this model: checked on a weightless (meta-device) copy before
    anything is loaded or written, instead of PEFT's traceback after the base was saved."""
    targets = model_args.lora_target_modules
    if model_args.finetune_mode not in ADAPTER_MODES or not targets or targets in ("all-linear", ["all-linear"]):
        return
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    with torch.device("meta"):
        model = model_class(config)
    lora = LoraConfig(target_modules=targets)
    names = [name for name, _ in model.named_modules() if name]
    if any(check_target_module_exists(lora, name) for name in names):
        return
    linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    raise RecipeError(
        f"lora_target_modules={targets!r} match no module of this {config.model_type} model; name some of its linear "
        f"layers ({', '.join(linears[:12])}{', ...' if len(linears) > 12 else ''}), use 'all-linear', or leave it "
        "unset for the model's own choice"
    )


def torch_dtype(model_args: ModelArguments) -> torch.dtype | str | None:
    if model_args.dtype in (None, "auto"):
        return model_args.dtype
    return getattr(torch, model_args.dtype)


def quantization_config(model_args: ModelArguments) -> BitsAndBytesConfig | None:
    """QLoRA's frozen 4-bit base (nf4 by default), computing in the recipe's dtype: TRL's
    ``get_quantization_config`` (``finetune_mode: qlora`` sets ``load_in_4bit``); ``dtype: auto`` is no compute
    dtype, so it computes in float32 as an unset dtype does."""
    from trl import get_quantization_config

    if model_args.dtype == "auto":
        model_args = dataclasses.replace(model_args, dtype=None)
    return get_quantization_config(model_args)


def kbit_device_map() -> dict[str, int] | None:
    """Where a 4-bit base loads: each DDP / FSDP process on its own GPU (TRL's rule; without it every process
    would quantise onto GPU 0); nothing on the CPU, and nothing under DeepSpeed, which places the weights itself."""
    from vla_recipes.distributed import strategy_from_env

    if not torch.cuda.is_available() or strategy_from_env().kind == "deepspeed":
        return None
    return {"": PartialState().local_process_index}


def load_model(
    model_args: ModelArguments, config: PretrainedConfig, model_class: type[PreTrainedModel], output_dir: str
) -> PreTrainedModel:
    """The model to fine-tune, before any adapter is added."""
    path = model_args.model_name_or_path
    if model_args.model_config is not None:
        model = model_class(config)
        if model_args.attn_implementation:  # what from_pretrained's argument does for a pretrained model
            model.set_attn_implementation(model_args.attn_implementation)
        if model_args.finetune_mode not in ADAPTER_MODES:
            return model.to(torch_dtype(model_args)) if isinstance(torch_dtype(model_args), torch.dtype) else model
        path = str(Path(output_dir).resolve() / "base_model")
        with main_process_first():  # one writer (every rank set the same seed: same weights); the others load it
            if PartialState().is_main_process:
                model.save_pretrained(path)
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    # A Hub model is downloaded by the main process first, then read from the cache by the others (one download,
    # not one per rank: the Hub rate-limits).
    order = main_process_first() if not Path(path).is_dir() else contextlib.nullcontext()
    try:
        with order:
            return model_class.from_pretrained(
                path,
                config=config,
                revision=model_args.model_revision,
                dtype=torch_dtype(model_args),
                quantization_config=quantization_config(model_args),
                device_map=kbit_device_map() if model_args.finetune_mode == "qlora" else None,
                trust_remote_code=model_args.trust_remote_code,
                **kwargs,
            )
    except AdapterBaseMismatchError as e:
        raise RecipeError(f"model_name_or_path: {e}") from None


def keep_cpu_4bit_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50) repacks 4-bit weights on CPU for an inference-only kernel the first time a layer runs
    in eval mode; training after an evaluation then fails in that kernel. Training on CPU keeps the trainable
    layout (GPUs are unaffected)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_finetune_mode(
    model: PreTrainedModel,
    model_args: ModelArguments,
    gradient_checkpointing: bool = False,
    modules_to_save: list[str] | None = None,
):
    """Freeze / wrap the model for the recipe's ``finetune_mode``; returns the model to train."""
    mode = model_args.finetune_mode
    if mode == "expert_only":
        model.freeze_vlm()
    if mode not in ADAPTER_MODES:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import get_peft_config

    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_cpu_4bit_trainable(model)
    # TRL's LoraConfig from the recipe, with the model's own target modules by default and the family's trained
    # heads kept beside the recipe's lora_modules_to_save; TRL has no init_lora_weights (OpenVLA's is gaussian).
    lora = get_peft_config(
        dataclasses.replace(
            model_args,
            lora_target_modules=model_args.lora_target_modules or model.lora_target_modules(),
            lora_modules_to_save=[*(model_args.lora_modules_to_save or []), *(modules_to_save or [])] or None,
        )
    )
    init = True if model_args.lora_init_weights == "true" else model_args.lora_init_weights
    return get_peft_model(model, dataclasses.replace(lora, init_lora_weights=init))
