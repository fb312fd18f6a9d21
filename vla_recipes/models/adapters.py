"""Loading a LoRA/QLoRA output folder with ``from_pretrained`` like any other model folder.

Such a folder holds the adapter (``adapter_config.json`` naming the base model, adapter weights) and a
``config.json`` with the fine-tune's ``norm_stats``, but no base weights. transformers would use the
base's config (the base's statistics) or look for weights in the folder; here the base weights come
from ``base_model_name_or_path``, the config from the folder, and the adapter is merged in (PEFT),
giving a plain model of the class for inference. Keep training an adapter with
``peft.PeftModel.from_pretrained(base, folder, is_trainable=True)`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

ADAPTER_CONFIG_NAME = "adapter_config.json"
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def adapter_base(folder: str | Path) -> str | None:
    """The base model of a local adapter-only folder, or None when ``folder`` is not one."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file() or any((folder / name).exists() for name in _WEIGHT_FILES):
        return None
    return json.loads((folder / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"]


class AdapterFolderMixin:
    """Put before ``PreTrainedModel`` in the bases of a model class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        base = adapter_base(pretrained_model_name_or_path) if pretrained_model_name_or_path else None
        if base is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from peft import PeftModel

        if kwargs.get("config") is None:
            kwargs["config"] = cls.config_class.from_pretrained(pretrained_model_name_or_path)
        kwargs.pop("adapter_kwargs", None)  # set by AutoModel for this very folder: the adapter is applied below
        model = super().from_pretrained(base, *args, **kwargs)
        return PeftModel.from_pretrained(model, pretrained_model_name_or_path).merge_and_unload()
