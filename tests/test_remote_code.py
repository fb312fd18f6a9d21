"""A saved output folder loads with ``trust_remote_code=True`` where vla_recipes is not installed (DESIGN.md)."""

from __future__ import annotations

import ast
import copy
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import run
from transformers.dynamic_module_utils import get_imports

from vla_recipes.families import package_families
from vla_recipes.remote_code import auto_classes, flatten_imports, module_closure, write_remote_code

# Runs in a fresh interpreter where `import vla_recipes` fails: loads every folder through the Auto classes with
# trust_remote_code=True and prints, per folder, the class's module and the largest difference to the reference.
LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, sys
    sys.modules["vla_recipes"] = None  # as on a machine where the package is not installed
    try:
        import vla_recipes
        sys.exit("vla_recipes is importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    report = {}
    for folder in sys.argv[1:]:
        case = torch.load(f"{folder}.inputs.pt", weights_only=True)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        if config.model_type == "openvla":
            inputs = processor(images=[i.numpy() for i in case["images"]], text=case["text"])
            actions = model.predict_action(**inputs)
        else:
            inputs = processor(images=case["images"], text=case["text"], state=case["state"])
            actions = model.predict_action(**inputs, noise=case["noise"])
        report[folder] = {
            "modules": sorted({type(o).__module__ for o in (config, model, processor, processor.image_processor)}),
            "max_abs_diff": (actions - case["expected"]).abs().max().item(),
        }
    print(json.dumps(report))
    """
)


def norm_stats(action_dim: int, state_dim: int) -> dict:
    rng = np.random.default_rng(0)

    def stats(dim: int) -> dict[str, list[float]]:
        q01, q99 = -1 - rng.random(dim), 1 + rng.random(dim)
        return {
            "mean": rng.normal(size=dim).tolist(),
            "std": (0.5 + rng.random(dim)).tolist(),
            "min": (q01 - 1).tolist(),
            "max": (q99 + 1).tolist(),
            "q01": q01.tolist(),
            "q99": q99.tolist(),
        }

    return {
        "reach": {
            "action": stats(action_dim) | {"mask": [True] * (action_dim - 1) + [False]},
            "proprio": stats(state_dim),
        }
    }


def tiny(model_type: str):
    """A tiny random model with statistics, and its processor, as sft.py builds them for a `model_config`."""
    from vla_recipes.families import get_family
    from vla_recipes.models.openvla import TINY_OPENVLA_CONFIG, OpenVLAConfig
    from vla_recipes.models.pi05 import TINY_PI05_CONFIG, Pi05Config

    torch.manual_seed(0)
    if model_type == "openvla":
        config = OpenVLAConfig(**copy.deepcopy(TINY_OPENVLA_CONFIG), norm_stats=norm_stats(7, 8))
        config.camera_keys, config.norm_mode = ["observation.images.image"], "bounds_q99"
    else:
        config = Pi05Config(**TINY_PI05_CONFIG, norm_stats=norm_stats(7, 8))
    family = get_family(model_type)
    model = family.model_class(config).eval()
    with torch.no_grad():  # open pi0.5's adaRMS gates (zero at init), else the actions ignore the VLM and its LoRA
        for name, param in model.named_parameters():
            if ".dense." in name:
                param.normal_(0.0, 0.1)
    return model, family.new_processor(config, None), family


def raw_inputs(model_type: str, config) -> dict:
    """Two samples of what a robot gives: images, task strings (and state + sampling noise for pi0.5)."""
    g = torch.Generator().manual_seed(1)
    text = ["pick up the bowl", "open the top drawer"]
    if model_type == "openvla":
        return {
            "images": [torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8) for _ in text],
            "text": text,
        }
    return {
        "images": {key: torch.rand(2, 3, 96, 128, generator=g) for key in config.camera_keys},
        "text": text,
        "state": torch.randn(2, config.state_dim, generator=g),
        "noise": torch.randn(2, config.action_horizon, config.max_action_dim, generator=g),
    }


def predict(model, processor, model_type: str, case: dict) -> torch.Tensor:
    if model_type == "openvla":
        return model.predict_action(**processor(images=[i.numpy() for i in case["images"]], text=case["text"]))
    inputs = processor(images=case["images"], text=case["text"], state=case["state"])
    return model.predict_action(**inputs, noise=case["noise"])


def save_run(model, processor, model_args, folder: Path) -> None:
    """What sft.py does at the end of a run: hub.save_for_inference on a Trainer holding the model."""
    from transformers import Trainer

    from vla_recipes.configs import VLATrainingArguments
    from vla_recipes.hub import save_for_inference

    args = VLATrainingArguments(output_dir=str(folder), report_to="none", use_cpu=True)
    save_for_inference(Trainer(model=model, args=args, processing_class=processor), model_args)


def output_folders(model_type: str, tmp_path: Path) -> list[Path]:
    """A full, a LoRA and a merged-LoRA output folder of ``model_type``, each with the actions it must predict."""
    from vla_recipes.configs import ModelArguments
    from vla_recipes.finetuning import apply_finetune_mode

    model, processor, family = tiny(model_type)
    case = raw_inputs(model_type, model.config)
    full = tmp_path / f"{model_type}-full"
    save_run(model, processor, ModelArguments(model_config={"model_type": model_type}), full)
    expected = {full: predict(model, processor, model_type, case)}

    model.save_pretrained(tmp_path / f"{model_type}-base")
    base = family.model_class.from_pretrained(tmp_path / f"{model_type}-base").eval()
    base_path = str(tmp_path / f"{model_type}-base")
    lora_args = ModelArguments(model_name_or_path=base_path, finetune_mode="lora", lora_r=4, merge_adapters=True)
    peft_model = apply_finetune_mode(base, lora_args, modules_to_save=family.modules_to_save(base))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make it invisible
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    lora = tmp_path / f"{model_type}-lora"
    expected[lora] = predict(peft_model.get_base_model(), processor, model_type, case)
    save_run(peft_model, processor, lora_args, lora)
    expected[lora / "merged"] = expected[lora]  # merge_adapters: true also writes a standalone merged model

    assert not torch.equal(expected[full], expected[lora])  # the adapter changes the predictions
    for folder, actions in expected.items():
        torch.save({**case, "expected": actions}, f"{folder}.inputs.pt")
    return list(expected)


def test_module_closure_ships_every_imported_module_flat() -> None:
    for model_type in package_families():
        targets = auto_classes(model_type)
        files = module_closure([t.rpartition(".")[0] for t in targets.values()])
        assert {"normalize.py", "adapters.py"} <= set(files), model_type
        # what transformers requires installed before it runs the code: no vla_recipes, and no peft for full models
        required = set().union(*(get_imports(path) for path in files.values()))
        assert not required & {"vla_recipes", "peft", "lerobot"}, (model_type, required)
        for name, path in files.items():
            imports = [
                n for n in ast.walk(ast.parse(flatten_imports(path.read_text()))) if isinstance(n, ast.ImportFrom)
            ]
            relative = [(n.level, f"{n.module}.py") for n in imports if n.level]
            assert all(level == 1 and module in files for level, module in relative), (model_type, name, relative)
    assert flatten_imports("from ...data.normalize import x\n    from .sib import (a,\n") == (
        "from .normalize import x\n    from .sib import (a,\n"
    )


def test_output_folders_load_with_trust_remote_code_without_the_package(tmp_path: Path) -> None:
    folders = output_folders("openvla", tmp_path) + output_folders("pi05", tmp_path)
    config = json.loads((folders[0] / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_openvla.OpenVLAForActionPrediction"
    lora = tmp_path / "pi05-lora"
    assert (lora / "adapter_config.json").is_file() and not (lora / "model.safetensors").exists()

    result = run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, *map(str, folders)],
        timeout=300,
        cwd=tmp_path,  # the checkout is not on the path either
        env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for folder in folders:
        entry = report[str(folder)]
        assert all(module.startswith("transformers_modules.") for module in entry["modules"]), entry
        # the same code and weights: only the float reduction order may differ
        assert entry["max_abs_diff"] <= 1e-5, (str(folder.relative_to(tmp_path)), entry)


def test_unknown_model_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type 'nope' is not supported"):
        write_remote_code(tmp_path, "nope")
