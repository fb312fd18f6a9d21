"""Convert a downloaded openvla/openvla-7b folder into this package's format (optional: ``model_name_or_path:
openvla/openvla-7b`` loads the published checkpoint as it is, reading its config and processor files at load time).

    python -m vla_recipes.models.openvla.convert_openvla_checkpoint --input_dir openvla-7b --output_dir out

openvla-7b's state dict already has this package's layout key for key, so no key is renamed: every tensor is
checked (name and shape) against ``OpenVLAForActionPrediction`` built on the meta device, and the conversion
stops before writing anything if one is missing, unexpected or of another shape. The prismatic config.json
loses its remote-code fields (``auto_map``...), its ``timm_model_ids`` become the ViT configs, ``norm_stats``
and ``text_config`` are kept; the tokenizer is re-saved with an ``OpenVLAProcessor``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_openvla import OpenVLAConfig
from .modeling_openvla import OpenVLAForActionPrediction
from .processing_openvla import OpenVLAProcessor

# Fields of the prismatic config.json that point at its remote code or are rewritten on save.
DROPPED_CONFIG_FIELDS = ("auto_map", "architectures", "model_type", "transformers_version")
INDEX_FILE = "model.safetensors.index.json"


def convert_config(prismatic: dict[str, Any]) -> OpenVLAConfig:
    """Our config from openvla-7b's config.json dict; ``action_dim`` from ``norm_stats`` when they agree."""
    fields = {k: v for k, v in prismatic.items() if k not in DROPPED_CONFIG_FIELDS}
    action_dims = {len(stats["action"]["q01"]) for stats in (fields.get("norm_stats") or {}).values()}
    if len(action_dims) == 1:
        fields.setdefault("action_dim", action_dims.pop())
    config = OpenVLAConfig(**fields)
    config.architectures = [OpenVLAForActionPrediction.__name__]
    return config


def expected_shapes(config: OpenVLAConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of our model and its shape, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def weight_files(input_dir: Path) -> list[str]:
    """The checkpoint's safetensors files (sharded or not)."""
    if (input_dir / INDEX_FILE).exists():
        return sorted(set(json.loads((input_dir / INDEX_FILE).read_text())["weight_map"].values()))
    if (input_dir / "model.safetensors").exists():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{input_dir} holds neither model.safetensors nor {INDEX_FILE}")


def check_state_dict(input_dir: Path, files: list[str], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise one error naming every missing, unexpected or mis-shaped tensor (reads headers only)."""
    found: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(input_dir / name, framework="pt") as f:
            keys = f.keys()  # safe_open is not iterable
            found.update({key: tuple(f.get_slice(key).get_shape()) for key in keys})
    problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
    problems += [
        f"{k}: checkpoint {found[k]} vs model {expected[k]}"
        for k in sorted(found.keys() & expected.keys())
        if found[k] != expected[k]
    ]
    if problems:
        raise ValueError(f"{input_dir} does not match the OpenVLA layout of its config: " + "; ".join(problems[:20]))


def convert(input_dir: str | Path, output_dir: str | Path) -> None:
    """Check everything first, then write config.json, the safetensors (same keys) and the processor files."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output_dir {output_dir} is not empty; pick a new folder")
    config = convert_config(json.loads((input_dir / "config.json").read_text()))
    files = weight_files(input_dir)
    check_state_dict(input_dir, files, expected_shapes(config))
    processor = OpenVLAProcessor.from_pretrained(input_dir)  # reads the published processor files

    output_dir.mkdir(parents=True, exist_ok=True)
    for name in files:  # one shard in memory at a time
        with safe_open(input_dir / name, framework="pt") as f:
            keys = f.keys()
            save_file({key: f.get_tensor(key) for key in keys}, output_dir / name, metadata={"format": "pt"})
    if (input_dir / INDEX_FILE).exists():
        (output_dir / INDEX_FILE).write_text((input_dir / INDEX_FILE).read_text())
    config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True, help="a downloaded openvla/openvla-7b folder")
    parser.add_argument("--output_dir", required=True, help="where to write the converted model")
    args = parser.parse_args()
    convert(args.input_dir, args.output_dir)
    print(f"converted {args.input_dir} -> {args.output_dir}: every tensor matched the OpenVLA layout, none renamed")


if __name__ == "__main__":
    main()
