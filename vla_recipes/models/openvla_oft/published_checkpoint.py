"""Load OpenVLA-OFT checkpoints in the layout ``moojink/openvla-oft``'s ``vla-scripts/finetune.py`` writes:

    config.json, model-*.safetensors      the VLA with the LoRA (r 32) merged in (``model_type: openvla``)
    action_head--<step>_checkpoint.pt     L1RegressionActionHead state dict (torch.save, keys ``module.model.*``)
    proprio_projector--<step>_checkpoint.pt   ProprioProjector state dict (``module.fc1.*``, ``module.fc2.*``)
    dataset_statistics.json               the fine-tuning data's statistics ({dataset: {"action", "proprio"}})
    lora_adapter/                         the adapter alone (not needed once merged)

The head and projector widths give ``action_dim`` and ``state_dim``; what the weights cannot tell (the chunk
length and the number of cameras: 8 and 2 on LIBERO, 25 and 3 on ALOHA) is passed to ``from_pretrained``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from .configuration_openvla_oft import OpenVLAOFTConfig

# Config fields a caller may give ``from_pretrained`` for a folder whose config.json is OpenVLA's.
OFT_FIELDS = ("action_horizon", "num_images", "state_dim", "action_dim", "action_head_hidden_dim")
STATS_FILE = "dataset_statistics.json"


def module_file(folder: Path, module: str) -> Path | None:
    """The newest ``<module>--<step>_checkpoint.pt`` (or ``--latest_checkpoint.pt``) in ``folder``, if any."""
    files = list(folder.glob(f"{module}--*_checkpoint.pt"))
    if not files:
        return None

    def step(path: Path) -> float:
        found = re.fullmatch(rf"{module}--(\d+)_checkpoint\.pt", path.name)
        return int(found.group(1)) if found else float("inf")  # latest_checkpoint.pt

    return max(files, key=step)


def load_module_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved by openvla-oft, without DDP's ``module.`` prefix (tensors only: ``weights_only``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key.removeprefix("module."): value for key, value in state.items()}


def oft_config_for(path: Any, kwargs: dict[str, Any]) -> OpenVLAOFTConfig:
    """The OFT config of a folder: its own, or one built on its OpenVLA config and published module files.
    ``kwargs``' OFT fields are taken out of it (they are config fields, not ``from_pretrained`` options)."""
    changes = {key: kwargs.pop(key) for key in OFT_FIELDS if key in kwargs}
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    config = AutoConfig.from_pretrained(path, **hub_kwargs)
    if isinstance(config, OpenVLAOFTConfig):
        for key, value in changes.items():
            setattr(config, key, value)
        return config
    folder = Path(str(path))
    if folder.is_dir():
        llm_dim = config.text_config.hidden_size
        head = module_file(folder, "action_head")
        if head is not None:
            fc1 = load_module_state(head)["model.fc1.weight"]
            changes.setdefault("action_dim", fc1.shape[1] // llm_dim)
            changes.setdefault("action_head_hidden_dim", fc1.shape[0])
        proprio = module_file(folder, "proprio_projector")
        if proprio is not None:
            changes.setdefault("state_dim", load_module_state(proprio)["fc1.weight"].shape[1])
        if (folder / STATS_FILE).exists():  # the merged config.json keeps the base model's statistics
            changes["norm_stats"] = {**(config.norm_stats or {}), **json.loads((folder / STATS_FILE).read_text())}
    oft = OpenVLAOFTConfig.from_openvla(config, **changes)
    oft.architectures = ["OpenVLAOFTForActionPrediction"]
    return oft


def load_published_modules(model: torch.nn.Module, folder: Path) -> None:
    """Load the action head and proprio projector files of ``folder`` into ``model`` (strict: every key, every
    shape), when the folder has them; our own folders keep these modules in their safetensors."""
    for name in ("action_head", "proprio_projector"):
        path = module_file(folder, name)
        if path is None:
            continue
        module = getattr(model, name)
        if module is None:
            raise ValueError(f"{path} holds a proprio projector but the model has none: pass state_dim")
        weight = next(module.parameters())
        state = {k: v.to(weight.device, weight.dtype) for k, v in load_module_state(path).items()}
        module.load_state_dict(state, strict=True)
