"""MetaWorld demonstrations (``vla_recipes.data.collect``) and closed loop in the ``metaworld_sized`` env.

The point of the fast test is the train/closed-loop match: what the collector writes for a seed is, frame for frame,
what ``recipes/rollout.py``'s env and observation processing give a policy for that seed. The slow test runs the
whole pipeline (collect, train, roll out) on a few episodes. Both need the ``sim`` extra (``make install-sim``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from cli import ROOT, accelerate_launch, load_script, run

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: render headless
pytest.importorskip("metaworld", reason="needs MetaWorld: make install-sim (pip install -e '.[sim]')")

from vla_recipes.configs import RecipeError  # noqa: E402
from vla_recipes.data import collect  # noqa: E402

TASK, SIZE = "reach-v3", 56


def collect_args(root, *extra: str) -> list[str]:
    return ["--task", TASK, "--root", str(root), "--image_size", str(SIZE), *extra]


CAMERA_KEYS = {  # LeRobot's one camera keeps LeRobot's key; several are named as preprocess_observation names them
    ("corner2",): ["observation.image"],
    ("corner2", "topview"): ["observation.images.corner2", "observation.images.topview"],
}


@pytest.fixture(scope="module", params=list(CAMERA_KEYS), ids="+".join)
def collected(request, tmp_path_factory):
    """One reach-v3 expert episode at 56x56; a stale ``.partial`` folder (an interrupted run) is in the way."""
    root = tmp_path_factory.mktemp("mw") / "reach"
    stale = root.with_name("reach.partial") / "meta"
    stale.mkdir(parents=True)
    (stale / "info.json").write_text("{}")
    collect.main(collect_args(root, "--episodes", "1", "--cameras", *request.param))
    return root, CAMERA_KEYS[request.param]


def test_collector_frames_equal_the_rollout_envs(collected):
    from lerobot.datasets import LeRobotDataset
    from lerobot.envs import make_env, make_env_pre_post_processors
    from lerobot.utils.constants import ACTION, OBS_STATE

    from vla_recipes.envs.metaworld import expert_action

    collected, cameras = collected
    record = json.loads((collected / "meta/collection.json").read_text())
    assert record["seeds"] == [100_000] and not collected.with_name("reach.partial").exists()
    info = json.loads((collected / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 1
    assert [key for key, ft in info["features"].items() if ft["dtype"] == "image"] == cameras
    assert all(info["features"][key]["shape"] == [SIZE, SIZE, 3] for key in cameras)
    dataset = LeRobotDataset("local/reach", root=collected)
    assert dataset[0]["task"] == record["task_description"] == "Reach a goal position"

    # The env recipes/rollout.py builds, with eval_policy's observation processing, replayed from the same seed.
    from vla_recipes.closed_loop import env_config

    env_cfg = env_config("metaworld_sized", json.dumps(record["env_kwargs"]))
    vector_env = make_env(env_cfg, n_envs=1)[TASK][0]
    preprocessor, _ = make_env_pre_post_processors(env_cfg, None)
    raw, _ = vector_env.reset(seed=record["seeds"])
    for index in range(dataset.num_frames):
        frame = dataset[index]
        observation = collect.policy_observation(raw, preprocessor)
        for key in cameras:
            assert torch.equal(frame[key], observation[key][0])  # bit-identical pixels
        assert torch.equal(frame[OBS_STATE], observation[OBS_STATE][0])
        np.testing.assert_array_equal(frame[ACTION].numpy(), expert_action(vector_env.envs[0]))
        raw, _, _, _, step_info = vector_env.step(frame[ACTION].numpy()[None])
    assert bool(step_info["is_success"][0])  # the last recorded action is the one that succeeded
    vector_env.close()

    if len(cameras) > 1:  # the cameras differ (a second camera adds a view, not a copy)
        assert not torch.equal(dataset[0][cameras[0]], dataset[0][cameras[1]])


def test_collector_reuses_only_the_same_collection(collected, tmp_path, capsys):
    """A finished dataset is reused (make demo-sim's cache) only when it is what the run asks for: one collected
    with other settings, or by a collector that wrote stale first frames, stops the run and says why."""
    root = tmp_path / "reach"
    shutil.copytree(collected[0], root)
    record_file = root / "meta/collection.json"
    args = collect_args(
        root, "--episodes", "1", "--cameras", *json.loads(record_file.read_text())["env_kwargs"]["cameras"]
    )
    collect.main(args)
    assert "reusing it" in capsys.readouterr().out
    with pytest.raises(RecipeError, match=r"collected with episodes=1 \(asked 5\); delete it"):
        collect.main([*args, "--episodes", "5"])
    with pytest.raises(RecipeError, match=r"task='reach-v3' \(asked 'drawer-open-v3'\), image_size=56 \(asked 64\)"):
        collect.main([*args, "--task", "drawer-open-v3", "--image_size", "64"])
    record = json.loads(record_file.read_text())
    del record["collector_version"]  # what collectors before the first-frame fix wrote
    record_file.write_text(json.dumps(record))
    with pytest.raises(RecipeError, match=r"collector version 1, and since then the first frame is rendered after"):
        collect.main(args)
    record_file.unlink()  # a LeRobot dataset from elsewhere
    with pytest.raises(RecipeError, match=r"holds a LeRobot dataset this collector did not write"):
        collect.main(args)
    assert json.loads((root / "meta/info.json").read_text())["total_episodes"] == 1  # nothing was overwritten


def test_steps_after_success_extend_the_episode(collected, tmp_path):
    """``--steps_after_success`` keeps the episode as it was up to its success and appends what the expert does next:
    the policy also sees the expert slow down at the goal, which an episode cut at success never shows."""
    from lerobot.datasets import LeRobotDataset
    from lerobot.utils.constants import ACTION

    source, cameras = collected
    env_kwargs = json.loads((source / "meta/collection.json").read_text())["env_kwargs"]
    root = tmp_path / "hold"
    args = collect_args(root, "--episodes", "1", "--cameras", *env_kwargs["cameras"], "--steps_after_success", "6")
    collect.main(args)
    cut, held = LeRobotDataset("local/reach", root=source), LeRobotDataset("local/hold", root=root)
    assert held.num_frames == cut.num_frames + 6
    assert json.loads((root / "meta/collection.json").read_text())["steps_after_success"] == 6
    for index in range(cut.num_frames):  # the same seed: the frames up to the success are unchanged
        assert all(torch.equal(cut[index][key], held[index][key]) for key in [*cameras, ACTION])
    extra = torch.stack([held[i][ACTION][:3] for i in range(cut.num_frames, held.num_frames)]).norm(dim=1)
    assert torch.all(extra[1:] < extra[:-1])  # the expert closes in on the goal: ever smaller moves
    with pytest.raises(RecipeError, match=r"steps_after_success=6 \(asked 0\)"):
        collect.main(args[:-2])


def test_first_frame_shows_this_episodes_goal():
    """MetaWorld's reset moves reach-v3's goal site after its last ``mj_forward``; rendered as is, an episode's first
    frame showed the goal elsewhere, so the demonstrations' first frames and a policy's first chunk in closed loop
    saw a goal that was not there (benchmarks/closed_loop_runs.md, runs 27-30). The first frame must show the scene
    as the simulator state has it: recomputing every position changes no pixel."""
    import mujoco

    from vla_recipes.envs.metaworld import sized_env

    env = sized_env(TASK, SIZE, 10)
    for seed in (100_000, 100_001):
        first, _ = env.reset(seed=seed)
        mujoco.mj_forward(env._env.model, env._env.data)
        np.testing.assert_array_equal(first["pixels"], env.render())
    env.close()


def test_collector_bad_input(tmp_path, monkeypatch):
    root = tmp_path / "data"
    with pytest.raises(RecipeError, match=r"unknown MetaWorld task 'reach-v9'; valid tasks: .*drawer-open-v3"):
        collect.main(["--task", "reach-v9", "--root", str(root)])
    with pytest.raises(RecipeError, match=r"cameras must be distinct MetaWorld cameras among .*'topview'"):
        collect.main(collect_args(root, "--cameras", "corner2", "wrist"))
    with pytest.raises(SystemExit):  # seeds below 100000 are evaluation seeds
        collect.main(collect_args(root, "--seed", "3"))
    # The expert cannot succeed in 2 steps: nothing that looks like a dataset is left behind.
    with pytest.raises(RecipeError, match=r"succeeded in 0 of 1 episodes, fewer than --episodes 1"):
        collect.main(collect_args(root, "--episodes", "1", "--episode_length", "2", "--max_attempts", "1"))
    assert not root.exists() and not root.with_name("data.partial").exists()
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(RecipeError, match=r"set MUJOCO_GL=egl"):
        collect.main(collect_args(root))


def test_rollout_random_baseline(tmp_path):
    out = tmp_path / "random"
    env_kwargs = json.dumps({"task": TASK, "image_size": SIZE, "episode_length": 5})
    args = ["--baseline", "random", "--env", "metaworld_sized", "--env_kwargs", env_kwargs, "--n_episodes", "2"]
    load_script("rollout").main([*args, "--batch_size", "2", "--videos", "0", "--output_dir", str(out)])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["closed_loop_baseline"] == "random" and results["closed_loop_success_rate"] == 0.0
    assert results["closed_loop_n_episodes"] == 2


@pytest.mark.slow
def test_metaworld_end_to_end(tmp_path):
    """Collect 2 episodes, train the demo's tiny pi0.5 a few steps, roll it out on 2 unseen seeds."""
    data, model = tmp_path / "mw_reach", tmp_path / "model"
    result = run([sys.executable, "-m", "vla_recipes.data.collect", "--task", TASK, "--episodes", "2", "--root",
                  str(data), "--image_size", "112", "--episode_length", "150"], timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped" in result.stdout
    result = accelerate_launch(
        "recipes/sft.py", "--config", str(ROOT / "recipes/demo/metaworld_pi05.yaml"), "--dataset_root", str(data),
        "--train_episodes", "0:1", "--eval_episodes", "1:2", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--dataloader_num_workers", "0", "--output_dir", str(model), timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    env_kwargs = json.dumps({"task": TASK, "image_size": 112, "episode_length": 20})
    result = run([sys.executable, str(ROOT / "recipes/rollout.py"), "--model", str(model), "--env", "metaworld_sized",
                  "--env_kwargs", env_kwargs, "--n_episodes", "2", "--batch_size", "2", "--n_action_steps", "5",
                  "--videos", "1"], timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((model / "eval_results.json").read_text())
    assert 0.0 <= results["closed_loop_success_rate"] <= 1.0 and results["closed_loop_n_episodes"] == 2
    assert (model / "videos" / f"{TASK}_0" / "eval_episode_0.mp4").stat().st_size > 0  # <suite>_<task id>
    summary = run([sys.executable, str(ROOT / "recipes/closed_loop_summary.py"), str(model)], timeout=60)
    assert "95% CI" in summary.stdout, summary.stderr[-2000:]
