"""The pipeline as a library (``vla_recipes.pipeline.finetune`` from a notebook) and the ``vla-recipes`` command."""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib

import pytest
import yaml
from cli import DEMOS, ROOT, free_port, run

from vla_recipes.configs import RecipeError


def test_finetune_in_process_trains_saves_and_reloads(tmp_path, dataset_root, monkeypatch):
    """A notebook's call: a model config, a dataset and training arguments; the loss falls, the folder reloads with
    AutoModel / AutoProcessor, and ``recipe.json`` holds every model, data and training argument."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from vla_recipes.configs import DataArguments, ModelArguments, VLATrainingArguments
    from vla_recipes.pipeline import finetune

    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))
    data = DataArguments(
        dataset_repo_id="local/synthetic_reach", dataset_root=dataset_root, train_episodes=["0:5"], eval_episodes=["5"]
    )
    args = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 40,
        "learning_rate": 2e-3,
        "per_device_train_batch_size": 8,
        "logging_steps": 10,
        "eval_strategy": "no",
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    result = finetune(AutoConfig.for_model(**DEMOS["openvla"]["model_config"]), data, args)

    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert "eval_loss" in result.eval_metrics  # the held-out episode, evaluated once at the end
    out = tmp_path / "out"
    recipe = json.loads((out / "recipe.json").read_text())
    for group in (ModelArguments, DataArguments, VLATrainingArguments):
        assert {f.name for f in dataclasses.fields(group) if f.init} <= set(recipe), group.__name__
    assert recipe["model_config"]["model_type"] == recipe["model_type"] == "openvla"
    assert recipe["dataset_root"] == dataset_root and recipe["max_steps"] == 40 and recipe["world_size"] == 1

    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    actions = model.predict_action(**processor(images=[torch.rand(3, 64, 64)], text=["move the gripper"]))
    assert actions.shape == (1, 1, 7)


def test_finetune_takes_peft_and_bitsandbytes_configs_as_recipe_keys(tmp_path, monkeypatch):
    """A ``LoraConfig`` and a 4-bit ``BitsAndBytesConfig`` become the recipe's LoRA / QLoRA keys (what recipe.json
    records and a resume compares); the pipeline itself is not run here."""
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from vla_recipes import pipeline

    monkeypatch.setattr(pipeline, "run", lambda *groups: groups)
    lora = LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16)
    model_args, data_args, training_args = pipeline.finetune(
        "me/openvla",
        "me/data",
        {"output_dir": str(tmp_path)},
        peft_config=lora,
        quantization_config=bnb,
        dtype="bfloat16",
    )
    assert (model_args.model_name_or_path, model_args.finetune_mode, model_args.dtype) == (
        "me/openvla",
        "qlora",
        "bfloat16",
    )
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (8, 4, ["q_proj", "v_proj"])
    assert (model_args.use_bnb_nested_quant, model_args.bnb_4bit_quant_storage) == (True, "bfloat16")
    assert model_args.lora_init_weights == "gaussian" and model_args.use_peft and model_args.load_in_4bit
    assert data_args.dataset_repo_id == "me/data" and training_args.output_dir == str(tmp_path)

    full, *_ = pipeline.finetune(model_args, "me/data", {"output_dir": str(tmp_path)}, finetune_mode="full")
    assert (full.finetune_mode, full.use_peft, full.load_in_4bit, full.lora_r) == ("full", False, False, 8)


def test_finetune_refuses_what_the_recipe_cannot_express(tmp_path):
    """A PEFT or bitsandbytes setting the recipe has no key for fails naming it, before anything is read."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from vla_recipes.pipeline import finetune

    model, out = DEMOS["openvla"]["model_config"], {"output_dir": str(tmp_path / "out")}
    with pytest.raises(RecipeError, match="peft_config sets bias, which the recipe has no key for"):
        finetune(model, "local/none", out, peft_config=LoraConfig(bias="all"))
    with pytest.raises(RecipeError, match="8-bit is not supported"):
        finetune(model, "local/none", out, peft_config=LoraConfig(), quantization_config=BitsAndBytesConfig(True))
    with pytest.raises(RecipeError, match="quantization_config without peft_config"):
        finetune(model, "local/none", out, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert not (tmp_path / "out").exists()


def test_trl_model_config_keys_and_finetune_mode_agree(tmp_path):
    """TRL's ``use_peft`` / ``load_in_4bit`` pick LoRA / QLoRA; a contradiction and an old key name fail in one line;
    a one-item target list stays a list (TRL would make it a string, a regex for PEFT)."""
    from vla_recipes.configs import parse_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**DEMOS["openvla"], "finetune_mode": "full"}))
    model_args, *_ = parse_recipe(["--config", str(path), "--use_peft", "true", "--lora_target_modules", "q_proj"])
    assert (model_args.finetune_mode, model_args.lora_target_modules) == ("lora", ["q_proj"])
    model_args, *_ = parse_recipe(["--config", str(path), "--use_peft", "true", "--load_in_4bit", "true"])
    assert (model_args.finetune_mode, model_args.use_peft, model_args.load_in_4bit) == ("qlora", True, True)
    model_args, *_ = parse_recipe(["--config", str(path), "--finetune_mode", "qlora"])
    assert model_args.use_peft and model_args.load_in_4bit
    with pytest.raises(RecipeError, match="load_in_4bit: true needs finetune_mode: qlora, not 'expert_only'"):
        parse_recipe(["--config", str(path), "--finetune_mode", "expert_only", "--load_in_4bit", "true"])
    with pytest.raises(RecipeError, match="'bnb_4bit_use_double_quant' \\(renamed 'use_bnb_nested_quant'"):
        parse_recipe(["--config", str(path), "--bnb_4bit_use_double_quant", "true"])


def test_the_recipe_names_the_normalisation_modes_there_are():
    """configs.py cannot import the data layer, nor data/normalize.py (shipped as remote code) configs.py, nor any
    module: transformers copies a local folder's remote code one import level deep, so a module normalize.py
    imports (a shared ``norm_modes.py``) is missing from the modules cache and the folder fails to load."""
    from vla_recipes.configs import NORM_MODES
    from vla_recipes.data import normalize

    assert NORM_MODES == normalize.NORM_MODES


@pytest.mark.parametrize("command", ["sft", "evaluate", "rollout", "serve"])
def test_every_subcommand_has_help(command, capsys, monkeypatch):
    from vla_recipes.cli import main

    monkeypatch.setattr(sys, "argv", ["vla-recipes"])  # the command names itself in argv[0], for argparse
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: vla-recipes {command}" in capsys.readouterr().out


def test_the_console_script_is_the_cli(capsys):
    """``vla-recipes`` (pyproject's ``[project.scripts]``) is ``vla_recipes.cli:main``; no or an unknown command
    prints the commands."""
    from vla_recipes.cli import COMMANDS, main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vla-recipes": "vla_recipes.cli:main"}
    main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS), listing
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        main(["train"])


def test_accelerate_launches_the_cli_as_a_module(tmp_path):
    """``accelerate launch -m vla_recipes.cli sft ...`` (the documented multi-process form of ``vla-recipes sft``)
    reaches the recipe's checks: a bad key fails naming it."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**DEMOS["openvla"], "lerning_rate": 0.1}))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launcher += [str(ROOT / "accelerate_configs/single_gpu.yaml"), "--main_process_port", str(free_port())]
    launched = run([*launcher, "-m", "vla_recipes.cli", "sft", "--config", str(path)], timeout=300)
    assert launched.returncode != 0
    assert "error: unknown recipe key in the recipe YAML: 'lerning_rate'" in launched.stderr, launched.stderr[-2000:]
