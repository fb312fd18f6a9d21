"""``recipes/sft.py`` refusing a bad recipe before any work. Training end to end, the output and its reload are the
family contract's (tests/test_family_contract.py), for every registered family."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from cli import DEMOS, ROOT, run


def write_recipe(folder: Path, dataset_root: str, **overrides) -> Path:
    """The OpenVLA demo recipe shrunk to the test dataset (6 episodes) and a few steps."""
    recipe = {
        **DEMOS["openvla"],
        "dataset_root": dataset_root,
        "train_episodes": ["0:5"],
        "eval_episodes": ["5:6"],
        "output_dir": str(folder / "out"),
        "max_steps": 60,
        "per_device_train_batch_size": 8,
        "logging_steps": 10,
        "eval_steps": 30,
        "dataloader_num_workers": 0,
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


# (recipe overrides, command-line flags, the one line that names the culprit)
BAD_RECIPES = {
    "typo": ({"lerning_rate": 0.1}, [], "error: unknown recipe key in the recipe YAML: 'lerning_rate'"),
    "camera": (
        {},
        ["--camera_keys", "observation.images.top"],
        "camera_keys: 'observation.images.top' is not a camera",
    ),
    "state": ({}, ["--state_key", "observation.joint_pos"], "state_key: 'observation.joint_pos' is not a feature"),
    "mode": ({}, ["--finetune_mode", "expert_only"], "finetune_mode='expert_only' is not available for this model"),
    "output_dir": ({}, [], "exists and is not empty; set overwrite_output_dir: true"),
}


def test_bad_recipe_fails_fast_naming_the_culprit(tmp_path, dataset_root):
    """``python recipes/sft.py`` (the script's own stderr, no launcher): each bad recipe fails in one line naming the
    culprit, before any work; an output folder holding a previous run is left as it was. The five runs go two at a
    time: each is an interpreter start, and CI has two cores."""
    precious = tmp_path / "output_dir" / "out" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("a previous run")

    def sft(case: str):
        overrides, extra, _ = BAD_RECIPES[case]
        recipe = write_recipe(tmp_path / case, dataset_root, **overrides)
        return run([sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(recipe), *extra])

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(BAD_RECIPES, pool.map(sft, BAD_RECIPES), strict=True))
    for case, result in results.items():
        message = BAD_RECIPES[case][2]
        assert result.returncode != 0, case
        assert message in result.stderr, (case, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, case  # one clear line, not a stack trace
        if case != "output_dir":
            assert not (tmp_path / case / "out").exists(), case  # failed before any work
    assert precious.read_text() == "a previous run"
    assert sorted(p.name for p in precious.parent.iterdir()) == ["precious.txt"]
