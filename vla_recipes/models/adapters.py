"""Loading a LoRA/QLoRA output folder with ``from_pretrained`` like any other model folder.

Such a folder holds the adapter (``adapter_config.json`` naming the base model, adapter weights) and a
``config.json`` with the fine-tune's ``norm_stats``, but no base weights. transformers would use the
base's config (the base's statistics) or look for weights in the folder; here the base weights come
from ``base_model_name_or_path``, the config from the folder, and the adapter is merged in (PEFT),
giving a plain model of the class for inference. Keep training an adapter with
``peft.PeftModel.from_pretrained(base, folder, is_trainable=True)`` instead.

A base that is not the model the adapter was trained on (another architecture, other sizes) raises
``AdapterBaseMismatchError`` instead of loading with random weights or printing a screen-long report.
This module is copied into saved folders for ``trust_remote_code`` loads, so it imports only transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    is_peft_available,
)
from transformers.utils import logging as hf_logging

ADAPTER_CONFIG_NAME = "adapter_config.json"
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def adapter_base(folder: str | Path) -> str | None:
    """The base model of a local adapter-only folder, or None when ``folder`` is not one."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file() or any((folder / name).exists() for name in _WEIGHT_FILES):
        return None
    return json.loads((folder / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"]


class AdapterBaseMismatchError(ValueError):
    """The base named in ``adapter_config.json`` does not fit the model config saved beside the adapter."""

    def __init__(self, folder: Any, base: str, keys: list[str], what: str):
        super().__init__(
            f"the adapter in {str(folder)!r} does not fit its base model {base!r}: {len(keys)} base weights "
            f"{what} (first: {sorted(keys)[0]}); set base_model_name_or_path in {ADAPTER_CONFIG_NAME} to the model "
            "the adapter was trained on"
        )


def _load_base(cls: type, folder: Any, base: str, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
    """The base model with the adapter folder's config, or AdapterBaseMismatchError when its weights do not fit."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' missing/mismatched table: replaced by one line below
    try:
        model, info = super(AdapterFolderMixin, cls).from_pretrained(
            base, *args, **{**kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True}
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["mismatched_keys"]:
        keys = [key if isinstance(key, str) else key[0] for key in info["mismatched_keys"]]  # (key, shapes...)
        raise AdapterBaseMismatchError(folder, base, keys, "have other sizes")
    if info["missing_keys"]:
        raise AdapterBaseMismatchError(folder, base, list(info["missing_keys"]), "are not in it")
    return model, info


class AdapterFolderMixin:
    """Put before ``PreTrainedModel`` in the bases of a model class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        base = adapter_base(pretrained_model_name_or_path) if pretrained_model_name_or_path else None
        if base is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if is_peft_available():  # this form keeps peft optional for trust_remote_code loads of full models
            from peft import PeftModel
        else:
            raise ImportError(f"{pretrained_model_name_or_path} holds a LoRA adapter; loading it needs peft")

        if kwargs.get("config") is None:
            kwargs["config"] = cls.config_class.from_pretrained(pretrained_model_name_or_path)
        kwargs.pop("adapter_kwargs", None)  # set by AutoModel for this very folder: the adapter is applied below
        want_info = kwargs.pop("output_loading_info", False)
        model, info = _load_base(cls, pretrained_model_name_or_path, base, *args, **kwargs)
        merged = PeftModel.from_pretrained(model, pretrained_model_name_or_path).merge_and_unload()
        return (merged, info) if want_info else merged
