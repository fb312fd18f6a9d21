"""``relative_actions``: chunks made relative to the state for training, absolute again out of ``predict_action``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from cli import DEMOS, load_script

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.lerobot import dataset_norm_stats, load_metadata, relative_action_mask
from vla_recipes.data.normalize import default_relative_mask, to_absolute, to_relative
from vla_recipes.models.pi05.lerobot_format import pi05_kwargs_from_lerobot

REPO = "local/synthetic_reach"
HORIZON = 4


def data_args(root: str, **kw) -> DataArguments:
    return DataArguments(dataset_repo_id=REPO, dataset_root=root, action_horizon=HORIZON, **kw)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_round_trip_is_exact_and_matches_lerobot(kind):
    from lerobot.processor import to_relative_actions

    rng = np.random.default_rng(0)
    actions = rng.normal(size=(5, HORIZON, 7)).astype(np.float32).astype(np.float64)
    state = rng.normal(size=(5, 8)).astype(np.float32).astype(np.float64)
    mask = [True, False, True, True, True]  # shorter than the action: dims 5, 6 stay absolute
    a, s = (torch.from_numpy(actions), torch.from_numpy(state)) if kind == "torch" else (actions, state)
    relative = to_relative(a, s, mask)
    back = to_absolute(relative, s, mask)
    assert type(back) is type(a) and (np.asarray(back) == actions).all()  # exact, not close
    expected = to_relative_actions(torch.from_numpy(actions), torch.from_numpy(state), mask).numpy()
    np.testing.assert_array_equal(np.asarray(relative), expected)
    np.testing.assert_array_equal(np.asarray(relative)[..., [1, 5, 6]], actions[..., [1, 5, 6]])
    np.testing.assert_array_equal(np.asarray(relative)[:, 2, 0], actions[:, 2, 0] - state[:, 0])
    assert default_relative_mask(7) == [True] * 6 + [False]  # openpi's make_bool_mask(6, -1)


def test_statistics_are_those_of_the_relative_chunks(dataset_root, tmp_path):
    args = data_args(dataset_root, relative_actions=True, stats_cache_dir=str(tmp_path))
    meta = load_metadata(args)
    mask = relative_action_mask(args, 7, 8)
    episodes = [0, 2, 3]
    absolute = dataset_norm_stats(meta, args, "quantiles", None, episodes)[REPO]["action"]
    relative = dataset_norm_stats(meta, args, "quantiles", None, episodes, mask)[REPO]["action"]
    assert len(list(tmp_path.glob("*.json"))) == 3  # absolute action, state, relative action: each its own entry

    # The reference: every chunk step inside its episode, action[t + k] - state[t] on the masked dims.
    import pyarrow.parquet as pq

    table = pq.read_table(meta.root / meta.data_path.format(chunk_index=0, file_index=0)).to_pandas()
    rows = []
    for e in episodes:
        ep = table[table.episode_index == e]
        a, s = np.stack(ep["action"]).astype(np.float64), np.stack(ep["observation.state"]).astype(np.float64)
        for k in range(HORIZON):
            rows.append(a[k:] - np.where(mask, s[: len(a) - k, :7], 0))
    values = np.concatenate(rows)
    np.testing.assert_allclose(relative["q01"], np.quantile(values, 0.01, axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(relative["mean"], values.mean(axis=0), rtol=0, atol=1e-12)
    assert relative["q99"][6] == absolute["q99"][6]  # the gripper stays absolute
    assert not np.allclose(relative["q01"][:2], absolute["q01"][:2])  # x, y differ


@pytest.mark.parametrize(
    ("overrides", "action_dim", "state_dim", "message"),
    [
        ({"relative_actions": True}, 7, None, "relative_actions: true makes actions relative to the state, but state_"),
        ({"relative_actions": True, "relative_action_mask": [True] * 8}, 7, 8, "relative_action_mask has 8 entries"),
        ({"relative_actions": True, "relative_action_mask": [False, False, True]}, 7, 2, "makes action dim 2 relati"),
        ({"relative_action_mask": [True]}, 7, 8, "relative_action_mask is set but relative_actions is false"),
    ],
)
def test_bad_relative_settings_name_the_key(dataset_root, overrides, action_dim, state_dim, message):
    with pytest.raises(RecipeError, match=message):
        relative_action_mask(data_args(dataset_root, **overrides), action_dim, state_dim)


def test_lerobot_use_relative_actions_loads_with_its_mask():
    lerobot = {"type": "pi05", "output_features": {"action": {"type": "ACTION", "shape": [7]}}}
    assert "relative_action_mask" not in pi05_kwargs_from_lerobot(lerobot)
    names = ["x", "y", "z", "rx", "ry", "rz", "gripper_pos"]
    with_names = {**lerobot, "use_relative_actions": True, "action_feature_names": names}
    assert pi05_kwargs_from_lerobot(with_names)["relative_action_mask"] == [True] * 6 + [False]
    assert pi05_kwargs_from_lerobot({**lerobot, "use_relative_actions": True})["relative_action_mask"] == [True] * 7


def test_trained_on_relative_actions_predicts_absolute_ones(tmp_path, dataset_root, monkeypatch):
    """sft records the mask and the relative statistics; predict_action adds the state back; evaluation (absolute
    targets) runs unchanged; OpenVLA, which sees no state, refuses the key before the weights load."""
    from transformers import AutoModel, AutoProcessor

    from vla_recipes.data.lerobot import VLADataset
    from vla_recipes.data.normalize import unnormalize
    from vla_recipes.evaluation import predict_open_loop

    sft = load_script("sft")
    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))
    recipe = {
        **DEMOS["pi05"],
        "model_config": {**DEMOS["pi05"]["model_config"], "pi05": False},  # pi0: the state also enters the model
        "norm_mode": "mean_std",
        "dataset_root": dataset_root,
        "camera_keys": ["observation.images.image"],
        "relative_actions": True,
        "action_horizon": HORIZON,
        "train_episodes": ["0:5"],
        "eval_episodes": None,
        "eval_strategy": "no",
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "dataloader_num_workers": 0,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    sft.main(["--config", str(path)])

    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["relative_action_mask"] == [True] * 6 + [False]
    args = data_args(dataset_root)
    meta = load_metadata(args)
    absolute = dataset_norm_stats(meta, args, "mean_std", None, list(range(5)))[REPO]["action"]
    assert config["norm_stats"][REPO]["action"]["mean"][:2] != absolute["mean"][:2]

    model, processor = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    state = torch.rand(2, 8)
    inputs = processor(images=[[torch.rand(3, 64, 64)]] * 2, text=["go"] * 2, state=state)
    torch.testing.assert_close(inputs["reference_state"], state, rtol=0, atol=0)
    noise = torch.randn(2, HORIZON, model.config.max_action_dim)
    predicted = model.predict_action(**inputs, noise=noise)
    model_inputs = {k: v for k, v in inputs.items() if k != "reference_state"}
    relative = unnormalize(
        model.sample_actions(**model_inputs, noise=noise), config["norm_stats"][REPO]["action"], "mean_std"
    )
    torch.testing.assert_close(predicted[..., :6], relative[..., :6] + state[:, None, :6])
    torch.testing.assert_close(predicted[..., 6], relative[..., 6])
    with pytest.raises(ValueError, match="pass reference_state="):
        model.predict_action(**model_inputs)
    dataset = VLADataset(meta, data_args(dataset_root), ["observation.images.image"], [5])
    predictions = predict_open_loop(model, processor, dataset, batch_size=8)
    assert predictions.predicted.shape == predictions.target.shape == (16, HORIZON, 7)

    openvla = {**DEMOS["openvla"], **{k: recipe[k] for k in ("dataset_root", "train_episodes", "eval_episodes")}}
    openvla |= {"relative_actions": True, "output_dir": str(tmp_path / "openvla")}
    path.write_text(yaml.safe_dump(openvla))
    monkeypatch.setattr("vla_recipes.pipeline.load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(RecipeError, match="relative_actions: OpenVLA sees no robot state"):
        sft.main(["--config", str(path)])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"state_key": None}, "relative_actions: true makes actions relative to the state, but state_key is None; set"),
        ({"relative_action_mask": [True] * 8}, "relative_action_mask has 8 entries but the action 'action' has 7 dims"),
        (
            {"state_indices": ["6"]},
            "relative_action_mask makes action dim 5 relative, but the state the model sees has 1",
        ),
    ],
)
def test_sft_refuses_bad_relative_settings_before_the_weights(tmp_path, dataset_root, monkeypatch, overrides, message):
    sft = load_script("sft")
    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("vla_recipes.pipeline.load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    values = {**DEMOS["pi05"], "dataset_root": dataset_root, "camera_keys": ["observation.images.image"]}
    values |= {"train_episodes": ["0:5"], "eval_episodes": None, "action_horizon": HORIZON, "relative_actions": True}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values | {"output_dir": str(tmp_path / "out"), **overrides}))
    with pytest.raises(RecipeError) as error:
        sft.main(["--config", str(path)])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
