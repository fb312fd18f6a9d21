"""Recipe parsing: CLI > YAML > default, unknown keys named, episode specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vla_recipes.configs import RecipeError, parse_episodes, parse_recipe

RECIPE = """\
model_config: {model_type: openvla, n_action_bins: 64}
dataset_repo_id: local/synthetic
train_episodes: ["0:3", 5]
learning_rate: 1.0e-3
per_device_train_batch_size: 4
camera_keys: [observation.images.image]
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_yaml_sets_defaults_and_cli_overrides(recipe):
    model_args, data_args, training_args = parse_recipe(["--config", recipe, "--learning_rate", "2e-4"])
    assert model_args.model_config == {"model_type": "openvla", "n_action_bins": 64}
    assert training_args.learning_rate == 2e-4  # CLI beats YAML
    assert training_args.per_device_train_batch_size == 4  # YAML beats default
    assert training_args.weight_decay == 0.0  # default
    assert data_args.camera_keys == ["observation.images.image"]
    assert training_args.remove_unused_columns is False  # VLA default: keep pixel_values & co.
    assert parse_episodes(data_args.train_episodes) == [0, 1, 2, 5]


def test_model_config_as_json_on_the_cli(recipe):
    model_args, _, _ = parse_recipe(["--config", recipe, "--model_config", '{"model_type": "openvla"}'])
    assert model_args.model_config == {"model_type": "openvla"}


@pytest.mark.parametrize(
    ("extra_yaml", "extra_cli", "message"),
    [
        (
            "lerning_rate: 3\n",
            [],
            "unknown recipe key in the recipe YAML: 'lerning_rate' (did you mean 'learning_rate'?)",
        ),
        (
            "",
            ["--camera_key", "x"],
            "unknown recipe key in the command line: 'camera_key' (did you mean 'camera_keys'?)",
        ),
    ],
)
def test_unknown_key_is_named(tmp_path, extra_yaml, extra_cli, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE + extra_yaml)
    with pytest.raises(RecipeError) as e:
        parse_recipe(["--config", str(path), *extra_cli])
    assert str(e.value) == message


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml"):
        parse_recipe(["--config", str(tmp_path / "nope.yaml")])


def test_model_source_must_be_exactly_one(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("dataset_repo_id: x\n")
    with pytest.raises(RecipeError, match="exactly one of model_name_or_path"):
        parse_recipe(["--config", str(path)])


def test_bad_norm_mode_is_named(recipe):
    with pytest.raises(RecipeError, match="norm_mode='q95'"):
        parse_recipe(["--config", recipe, "--norm_mode", "q95"])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, None), ("0:3,7", [0, 1, 2, 7]), (["4:6"], [4, 5]), ([1, "3"], [1, 3])],
)
def test_parse_episodes(spec, expected):
    assert parse_episodes(spec) == expected


def test_bad_episode_spec_is_named():
    with pytest.raises(RecipeError, match="'a:b'"):
        parse_episodes(["a:b"])


@pytest.mark.parametrize(
    "path", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml")), ids=Path
)
def test_every_shipped_recipe_parses(path):
    """A typo in a shipped recipe is caught here, not on a user's GPU."""
    model_args, data_args, training_args = parse_recipe(["--config", path, "--use_cpu", "true"])  # bf16 needs a GPU
    assert data_args.dataset_repo_id and training_args.output_dir
