"""Bad input, tried: each one fails in one line that names the culprit and the fix, before any heavy work, and
leaves the user's folders as they were.

``recipes/sft.py``'s ``main`` runs in process with ``load_model`` replaced by a tripwire, so every check must
fire before the weights load; the few failures that can only happen later (a NaN loss, an adapter on the wrong
base model) run the real thing. test_sft.py checks the same errors from a subprocess (exit code, no traceback).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli import DEMOS, ROOT, load_script


@pytest.fixture(scope="module")
def sft():
    return load_script("sft")


@pytest.fixture(autouse=True)
def tripwire(sft, monkeypatch, tmp_path):
    """``load_model`` fails the test if reached; caches go to a temporary folder."""

    def load_model(*args, **kwargs):
        raise AssertionError("load_model was reached: the check did not fire before the weights load")

    monkeypatch.setattr("vla_recipes.pipeline.load_model", load_model)
    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))


def recipe_file(tmp_path: Path, root: str | None, demo: str = "openvla", **overrides) -> Path:
    recipe = {
        **DEMOS[demo],
        "dataset_root": root,
        "train_episodes": ["0:5"],
        "eval_episodes": ["5:6"],
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "dataloader_num_workers": 0,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def snapshot(*folders: str | Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders`` with its size and mtime: what 'untouched' means."""
    return {
        str(f): (f.stat().st_size, f.stat().st_mtime_ns)
        for folder in folders
        for f in sorted(Path(folder).rglob("*"))
        if f.is_file()
    }


def fails(sft, tmp_path: Path, argv: list[str], message: str, *user_folders: str | Path) -> str:
    """Run sft.main; it must raise a one-line RecipeError containing ``message``, create no output folder and
    change nothing in ``user_folders``."""
    from vla_recipes.configs import RecipeError

    before = snapshot(*user_folders)
    with pytest.raises(RecipeError) as error:
        sft.main(argv)
    text = str(error.value)
    assert message in text, text
    assert "\n" not in text, text
    assert not (tmp_path / "out").exists()
    assert snapshot(*user_folders) == before
    return text


def copy_dataset(dataset_root: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset_root, tmp_path / "dataset"))


# --- the recipe --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "extra", "message"),
    [
        ({"lerning_rate": 0.1}, [], "unknown recipe key in the recipe YAML: 'lerning_rate' (did you mean "),
        ({}, ["--lerning_rate", "0.1"], "unknown recipe key in the command line: 'lerning_rate' (did you mean "),
        ({"max_steps": "ten"}, [], "bad recipe value: argument --max_steps/--max-steps: invalid int value: 'ten'"),
        ({}, ["--max_steps", "ten"], "bad recipe value: argument --max_steps/--max-steps: invalid int value: 'ten'"),
        ({"per_device_train_batch_size": 8.5}, [], "per_device_train_batch_size in recipe file"),
        ({"camera_keys": "observation.images.image"}, [], "write a list: camera_keys: [observation.images.image]"),
        ({"save_strategy": False}, [], "save_strategy in recipe file"),  # YAML's bare `no`
        ({"model_config": 3}, [], "model_config in recipe file"),
    ],
)
def test_bad_recipe_key_or_type(sft, tmp_path, dataset_root, overrides, extra, message):
    recipe = recipe_file(tmp_path, dataset_root, **overrides)
    text = fails(sft, tmp_path, ["--config", str(recipe), *extra], message, dataset_root, recipe)
    if overrides.get("save_strategy") is False:
        assert "YAML reads a bare yes/no/on/off/true/false as a boolean: quote the value" in text


def test_missing_recipe_file(sft, tmp_path):
    fails(sft, tmp_path, ["--config", str(tmp_path / "nope.yaml")], "nope.yaml' cannot be read: No such file")


def test_model_config_the_config_class_rejects(sft, tmp_path, two_camera_root):
    pi05 = {**DEMOS["pi05"]["model_config"], "max_action_dim": 4}
    recipe = recipe_file(tmp_path, two_camera_root, "pi05", model_config=pi05, train_episodes=["0:3"])
    message = "model_config: Pi05Config: action_dim must be in 1..max_action_dim"
    fails(sft, tmp_path, ["--config", str(recipe), "--eval_episodes", "3:4"], message, two_camera_root)
    recipe = recipe_file(tmp_path, two_camera_root, "pi05", model_config={"model_type": "pi06"})
    message = "model_config: model_type 'pi06' is not known; use openvla, openvla_oft"  # , pi05 (or a plugin's)
    fails(sft, tmp_path, ["--config", str(recipe)], message)


# --- the dataset -------------------------------------------------------------------------------------------------


def test_dataset_not_here_and_hub_offline(sft, tmp_path, dataset_root):
    recipe = recipe_file(tmp_path, None, dataset_repo_id="someone/not_downloaded")
    message = "dataset 'someone/not_downloaded' is not on this machine and HF_HUB_OFFLINE is set: download it"
    fails(sft, tmp_path, ["--config", str(recipe)], message)


def test_dataset_not_here_and_hub_unreachable(sft, tmp_path, dataset_root, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    recipe = recipe_file(tmp_path, None, dataset_repo_id="someone/not_downloaded")
    message = "is not on this machine and the Hub cannot be reached (ConnectError): download it where there is network"
    fails(sft, tmp_path, ["--config", str(recipe)], message)


def test_dataset_root_without_a_dataset(sft, tmp_path, dataset_root):
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = recipe_file(tmp_path, str(empty))
    fails(sft, tmp_path, ["--config", str(recipe)], "holds no LeRobot dataset (no meta/info.json)", empty)


def test_lerobot_v21_dataset_gets_the_conversion_command(sft, tmp_path, dataset_root):
    root = copy_dataset(dataset_root, tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    recipe = recipe_file(tmp_path, str(root))
    command = "python -m lerobot.scripts.convert_dataset_v21_to_v30"
    message = f"in LeRobot's v2.1 format and lerobot reads v3.0: convert it with `{command} --repo-id=local/synthetic"
    text = fails(sft, tmp_path, ["--config", str(recipe)], message, root)
    assert f"--root={root} --push-to-hub=false`" in text
    assert importlib.util.find_spec("lerobot.scripts.convert_dataset_v21_to_v30") is not None  # the command exists


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--camera_keys", "observation.images.top"], "it has ['observation.images.image']"),
        (["--state_key", "observation.joint_pos"], "state_key: 'observation.joint_pos' is not a feature of the"),
        (["--action_key", "action.joints"], "action_key: 'action.joints' is not a feature of the dataset; it has"),
    ],
)
def test_missing_camera_state_or_action_lists_what_exists(sft, tmp_path, dataset_root, extra, message):
    text = fails(sft, tmp_path, ["--config", str(recipe_file(tmp_path, dataset_root)), *extra], message, dataset_root)
    if "key" in message:
        assert "'observation.state'" in text and "'action'" in text


def test_action_dim_beyond_the_models(sft, tmp_path, two_camera_root):
    pi05 = {**DEMOS["pi05"]["model_config"], "max_action_dim": 6, "action_dim": 6}
    recipe = recipe_file(tmp_path, two_camera_root, "pi05", model_config=pi05, train_episodes=["0:3"])
    message = "the dataset's 'action' has 7 dims, more than the model's max_action_dim=6"
    fails(sft, tmp_path, ["--config", str(recipe), "--eval_episodes", "3:4"], message, two_camera_root)


def test_action_horizon_longer_than_an_episode(sft, tmp_path, dataset_root):
    recipe = recipe_file(tmp_path, dataset_root, action_horizon=20)
    message = "action_horizon=20 is longer than episodes 0 (16 frames), 1 (16 frames)"
    text = fails(sft, tmp_path, ["--config", str(recipe)], message, dataset_root)
    assert "lower action_horizon or leave those episodes out" in text


def test_missing_norm_stats(sft, tmp_path, dataset_root):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"action": {"mean": [0.0] * 7, "std": [1.0] * 7}}))
    recipe = recipe_file(tmp_path, dataset_root, norm_stats_path=str(stats))
    text = fails(sft, tmp_path, ["--config", str(recipe)], "norm_mode='bounds_q99' needs q01, q99", dataset_root, stats)
    assert f"for 'action', which norm_stats_path {str(stats)!r} lacks; give a file that has them" in text


def test_truncated_video_names_file_and_episode(sft, tmp_path, dataset_root):
    root = copy_dataset(dataset_root, tmp_path)
    video = root / "videos/observation.images.image/chunk-000/file-000.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    recipe = recipe_file(tmp_path, str(root))
    message = f"video '{video}' (observation.images.image, episode 5) is corrupt or truncated"
    text = fails(sft, tmp_path, ["--config", str(recipe)], message, root)
    assert "download or encode it again, or leave the episodes in it out" in text


def test_nan_in_the_data_names_the_episodes(sft, tmp_path, dataset_root):
    import pandas as pd

    root = copy_dataset(dataset_root, tmp_path)
    data = root / "data/chunk-000/file-000.parquet"
    frame = pd.read_parquet(data)
    rows = frame.index[frame["episode_index"].isin([1, 3])][[2, -1]]  # one frame in episode 1, one in 3
    frame["action"] = [np.where(i in rows, np.nan, a) for i, a in zip(frame.index, frame["action"], strict=True)]
    frame.to_parquet(data)
    recipe = recipe_file(tmp_path, str(root))
    message = "'action' has NaN or inf values in episodes [1, 3]; fix the dataset or leave those episodes out"
    fails(sft, tmp_path, ["--config", str(recipe)], message, root)


# --- the run -----------------------------------------------------------------------------------------------------


def test_output_dir_of_another_run_is_refused(sft, tmp_path, dataset_root):
    from vla_recipes.configs import RecipeError

    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("a previous run")
    before = snapshot(out)
    recipe = recipe_file(tmp_path, dataset_root)
    for extra, message in [
        ([], "exists and is not empty; set overwrite_output_dir: true to replace it"),
        (["--resume_from_checkpoint", "true"], "holds no complete checkpoint (none); drop resume_from_checkpoint"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sft.main(["--config", str(recipe), *extra])
        assert snapshot(out) == before


def test_qlora_without_bitsandbytes(sft, tmp_path, dataset_root, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name)
    )
    recipe = recipe_file(tmp_path, dataset_root, finetune_mode="qlora")
    fails(
        sft, tmp_path, ["--config", str(recipe)], "finetune_mode='qlora' needs bitsandbytes: pip install", dataset_root
    )


def test_fsdp_with_qlora_it_cannot_shard(sft, tmp_path, dataset_root, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    recipe = recipe_file(tmp_path, dataset_root, finetune_mode="qlora")
    message = "shards the 4-bit base, which needs the packed weights stored in the compute dtype"
    fails(sft, tmp_path, ["--config", str(recipe)], message, dataset_root)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hub_model_id": "me/my policy"}, "hub_model_id='me/my policy' is not a Hub repo id"),
        ({"hub_model_id": "me/policy"}, "push_to_hub needs a Hub token with write access: run `hf auth login`"),
    ],
)
def test_push_to_hub_without_token_or_with_a_bad_repo_id(sft, tmp_path, dataset_root, monkeypatch, overrides, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    recipe = recipe_file(tmp_path, dataset_root, push_to_hub=True, **overrides)
    fails(sft, tmp_path, ["--config", str(recipe)], message, dataset_root)


# --- what can only fail once the model runs ----------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sft, tmp_path, dataset_root, monkeypatch):
    """The loss turns NaN at step 3: the run stops there, checkpoint-2 is kept and named, nothing is saved after."""
    from vla_recipes.finetuning import load_model
    from vla_recipes.trainers.base import NonFiniteError

    def nan_from_step_3(*args, **kwargs):
        model, calls = load_model(*args, **kwargs), []

        def hook(module, inputs, output):
            calls.append(module.training)
            if sum(calls) >= 3 and module.training:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr("vla_recipes.pipeline.load_model", nan_from_step_3)
    recipe = recipe_file(tmp_path, dataset_root, save_strategy="steps", save_steps=2, max_steps=6, eval_strategy="no")
    with pytest.raises(NonFiniteError) as error:
        sft.main(["--config", str(recipe)])
    out = tmp_path / "out"
    assert "the training loss is nan at step 3; stopped, nothing saved after it (the last good checkpoint is " in str(
        error.value
    ) and str(out / "checkpoint-2") in str(error.value)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()


def test_adapter_on_the_wrong_base_model(sft, tmp_path, dataset_root, monkeypatch):
    """A LoRA folder whose adapter_config.json names a base of other sizes, or of another architecture: one line,
    from AutoModel.from_pretrained and from sft.py (where it becomes a RecipeError)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel

    import vla_recipes.finetuning
    from vla_recipes.configs import RecipeError
    from vla_recipes.families import get_family
    from vla_recipes.models.adapters import AdapterBaseMismatchError
    from vla_recipes.models.openvla import OpenVLAForActionPrediction
    from vla_recipes.models.pi05 import Pi05ForActionPrediction

    config = AutoConfig.for_model(**DEMOS["openvla"]["model_config"])
    base = OpenVLAForActionPrediction(config)
    base.save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules=base.lora_target_modules())).save_pretrained(adapter)
    config.save_pretrained(adapter)
    get_family("openvla").new_processor(config, None).save_pretrained(adapter)  # as a run's folder has (hub.py)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "base")  # built, not loaded: PEFT left it empty
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    AutoModel.from_pretrained(adapter)  # the right base loads

    wider = {**DEMOS["openvla"]["model_config"]}
    wider["text_config"] = {**wider["text_config"], "intermediate_size": 256}
    OpenVLAForActionPrediction(AutoConfig.for_model(**wider)).save_pretrained(tmp_path / "wider")
    Pi05ForActionPrediction(AutoConfig.for_model(**DEMOS["pi05"]["model_config"])).save_pretrained(tmp_path / "pi05")
    for other, what in [("wider", "have other sizes (first: language_model."), ("pi05", "are not in it (first: ")]:
        adapter_config["base_model_name_or_path"] = str(tmp_path / other)
        (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
        with pytest.raises(AdapterBaseMismatchError, match=r"does not fit its base model") as error:
            AutoModel.from_pretrained(adapter)
        assert what in str(error.value) and "set base_model_name_or_path in adapter_config.json" in str(error.value)

    monkeypatch.setattr("vla_recipes.pipeline.load_model", vla_recipes.finetuning.load_model)  # the real one
    recipe = recipe_file(tmp_path, dataset_root, model_config=None, model_name_or_path=str(adapter))
    before = snapshot(adapter, tmp_path / "pi05")
    with pytest.raises(RecipeError, match="model_name_or_path: the adapter in .* does not fit its base model"):
        sft.main(["--config", str(recipe)])
    assert snapshot(adapter, tmp_path / "pi05") == before


# --- safety ------------------------------------------------------------------------------------------------------


def test_torch_load_is_weights_only_and_remote_code_is_opt_in():
    """Every torch.load in the package and the recipes passes weights_only=True; no code turns trust_remote_code
    on by itself; the recipe's default is off."""
    import ast

    from vla_recipes.configs import ModelArguments

    files = [*(ROOT / "vla_recipes").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")]
    loads, remote = [], []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load"):
                loads.append(path)
                weights_only = keywords.get("weights_only")
                assert isinstance(weights_only, ast.Constant) and weights_only.value is True, f"{path}: {name}"
            trust = keywords.get("trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                remote.append(f"{path}:{node.lineno}")
    assert loads, "no torch.load found: the scan is broken (trainers/base.py loads the scaler state)"
    assert not remote, remote
    assert ModelArguments(model_name_or_path="x").trust_remote_code is False
