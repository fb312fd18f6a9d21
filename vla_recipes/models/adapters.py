"""Loading a LoRA/QLoRA output folder with ``from_pretrained`` like any other model folder.

Such a folder holds the adapter (``adapter_config.json`` naming the base model, adapter weights) and a
``config.json`` with the fine-tune's ``norm_stats``, but no base weights. transformers would use the
base's config (the base's statistics) or look for weights in the folder; here the base weights come
from ``base_model_name_or_path``, the config from the folder, and the adapter is merged in (PEFT),
giving a plain model of the class for inference. Keep training an adapter with
``peft.PeftModel.from_pretrained(base, folder, is_trainable=True)`` instead.

The recorded base is portable (see ``record_portable_base``): a Hub id, ``./<path>`` inside the adapter folder (a
random-init base saved with it, found after ``mv`` and from any working directory), or an absolute local path,
whose absence is one ``BaseModelNotFoundError`` line; ``from_pretrained(folder, base_model_name_or_path=...)``
points at the base explicitly. An adapter repo on the Hub loads with its own config (the fine-tune's norm_stats).

A base that is not the model the adapter was trained on (another architecture, other sizes) raises
``AdapterBaseMismatchError`` instead of loading with random weights or printing a screen-long report.
This module is copied into saved folders for ``trust_remote_code`` loads, so it imports only transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    cached_file,
    is_peft_available,
)
from transformers.utils import logging as hf_logging

ADAPTER_CONFIG_NAME = "adapter_config.json"
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def adapter_base(folder: str | Path) -> str | None:
    """The base model of an adapter-only folder (local, or a Hub repo), as recorded; None when ``folder`` is not one."""
    if Path(folder).is_dir():
        config = Path(folder) / ADAPTER_CONFIG_NAME
        if not config.is_file() or any((Path(folder) / name).exists() for name in _WEIGHT_FILES):
            return None
    else:
        config = cached_file(folder, ADAPTER_CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
        if config is None:
            return None
    return json.loads(Path(config).read_text())["base_model_name_or_path"]


class BaseModelNotFoundError(OSError):
    """The local base model an adapter folder records is not on this machine (one line: what, and how to point)."""


def resolve_base(folder: Any, base: str) -> str:
    """Where the recorded base is: ``./...`` relative to the adapter folder (a random-init base saved inside it),
    an absolute local path, or a Hub id (anything else; a path relative to the working directory, as older
    folders recorded it, is still found there)."""
    relative = base.startswith(("./", "../"))
    if relative and Path(folder).is_dir():
        candidate = Path(folder) / base
    elif relative or Path(base).is_absolute():
        candidate = Path(base)
    else:
        return base
    if candidate.is_dir():
        return str(candidate)
    raise BaseModelNotFoundError(
        f"the base model {base!r} named in {ADAPTER_CONFIG_NAME} of {str(folder)!r} is not on this machine; "
        f"pass it: from_pretrained({str(folder)!r}, base_model_name_or_path=<its folder or Hub id>)"
    )


def record_portable_base(folder: str | Path) -> str:
    """Rewrite ``base_model_name_or_path`` of a saved adapter so that the folder loads after ``mv``, from another
    working directory or from the Hub: a base inside the folder as ``./<path>``, another local base as an absolute
    path (loading elsewhere then names it), a Hub id unchanged. Returns what was recorded."""
    path = Path(folder) / ADAPTER_CONFIG_NAME
    config = json.loads(path.read_text())
    base = Path(config["base_model_name_or_path"])
    if base.exists():
        resolved, root = base.resolve(), Path(folder).resolve()
        recorded = f"./{resolved.relative_to(root).as_posix()}" if resolved.is_relative_to(root) else str(resolved)
        config["base_model_name_or_path"] = recorded
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config["base_model_name_or_path"]


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
        # AutoModel, given a Hub adapter repo, passes its base here and the repo as ``_adapter_model_path``.
        folder = (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path", pretrained_model_name_or_path)
        base = adapter_base(folder) if folder else None
        override = kwargs.pop("base_model_name_or_path", None)
        if base is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if is_peft_available():  # this form keeps peft optional for trust_remote_code loads of full models
            from peft import PeftModel
        else:
            raise ImportError(f"{folder} holds a LoRA adapter; loading it needs peft")

        # The fine-tune's config (its norm_stats), not the base's that AutoModel read for a Hub adapter.
        own_config = cached_file(folder, CONFIG_NAME, _raise_exceptions_for_missing_entries=False) is not None
        if own_config and (kwargs.get("config") is None or folder != pretrained_model_name_or_path):
            kwargs["config"] = cls.config_class.from_pretrained(folder)
        kwargs.pop("adapter_kwargs", None)  # set by AutoModel for this very folder: the adapter is applied below
        want_info = kwargs.pop("output_loading_info", False)
        model, info = _load_base(cls, folder, override or resolve_base(folder, base), *args, **kwargs)
        merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
        merged.requires_grad_(True)  # trainable like any from_pretrained model (PEFT froze it to apply the adapter)
        return (merged, info) if want_info else merged
