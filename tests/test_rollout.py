"""Closed-loop rollouts: ``ChunkedPolicy`` re-planning, LeRobot's ``eval_policy`` driving a tiny OpenVLA in a fake
gymnasium env whose success per seed is known, ``recipes/rollout.py`` on it, and PushT end to end when installed."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from cli import ROOT, load_script, run

from vla_recipes.evaluation import ChunkedPolicy, evaluate_closed_loop

DEMO = yaml.safe_load((ROOT / "recipes/demo/openvla.yaml").read_text())
CAMERA = "observation.images.image"
HORIZON, SUCCESS_STEP, MAX_STEPS = 2, 3, 6


class FakeReach(gym.Env):
    """Even seeds succeed at step 3, odd seeds never (time out at step 6); it records every action it gets."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    actions: list[tuple[int, int, np.ndarray]] = []  # (seed, step, action), over all instances

    def __init__(self, render_mode: str = "rgb_array") -> None:
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Dict(
            {
                "pixels": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                "agent_pos": gym.spaces.Box(-np.inf, np.inf, (8,), np.float64),
            }
        )
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)
        self.task_description = self.task = "move the gripper to the red cube"

    def _observation(self) -> dict:
        rng = np.random.default_rng([self.seed_ + 1, self.t])  # seed -1: an autoreset
        return {"pixels": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "agent_pos": np.zeros(8)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seed_, self.t = seed if seed is not None else -1, 0
        return self._observation(), {"is_success": False}

    def step(self, action):
        FakeReach.actions.append((self.seed_, self.t, np.asarray(action)))
        self.t += 1
        success = self.seed_ % 2 == 0 and self.t >= SUCCESS_STEP
        return self._observation(), float(success), success, False, {"is_success": success}

    def render(self):
        return np.full((64, 64, 3), 40 * self.t, dtype=np.uint8)


gym.register(id="gym_fake_reach/FakeReach-v0", entry_point=FakeReach, max_episode_steps=MAX_STEPS)


def register_env_config():
    """A LeRobot ``EnvConfig`` for the fake env, so LeRobot's ``make_env`` builds it as it builds PushT."""
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.envs.configs import EnvConfig

    if "fake_reach" in EnvConfig.get_known_choices():
        return

    @EnvConfig.register_subclass("fake_reach")
    @dataclass
    class FakeReachEnv(EnvConfig):
        task: str | None = "FakeReach-v0"
        features: dict = field(
            default_factory=lambda: {
                "action": PolicyFeature(type=FeatureType.ACTION, shape=(7,)),
                "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(8,)),
                "pixels": PolicyFeature(type=FeatureType.VISUAL, shape=(64, 64, 3)),
            }
        )
        features_map: dict = field(
            default_factory=lambda: {
                "action": "action",
                "agent_pos": "observation.state",
                "pixels": "observation.image",
            }
        )

        @property
        def gym_kwargs(self) -> dict:
            return {}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, dataset_root) -> Path:
    """A saved, randomly initialised tiny OpenVLA predicting chunks of 2 actions (the demo config; no training:
    rollouts only need actions that come from the model)."""
    from vla_recipes.configs import DataArguments, ModelArguments
    from vla_recipes.data.lerobot import dataset_norm_stats, load_metadata
    from vla_recipes.families import get_family
    from vla_recipes.finetuning import load_config, load_model

    folder = tmp_path_factory.mktemp("rollout") / "model"
    data_args = DataArguments(dataset_repo_id="local/synthetic_reach", dataset_root=dataset_root, action_horizon=2)
    stats = dataset_norm_stats(load_metadata(data_args), data_args, "bounds_q99", [True] * 6 + [False])
    model_args = ModelArguments(model_config=DEMO["model_config"])
    family = get_family("openvla")
    config = load_config(model_args)
    family.configure(
        config, data_args, [CAMERA], action_dim=7, state_dim=8, norm_mode="bounds_q99", norm_stats=stats
    )  # fmt: skip
    torch.manual_seed(0)
    model = load_model(model_args, config, family.model_class, str(folder))
    model.save_pretrained(folder)
    family.build_processor(model.config, model_args).save_pretrained(folder)
    return folder


def load(folder: Path):
    from transformers import AutoModel, AutoProcessor

    import vla_recipes  # noqa: F401

    return AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


class StubModel(torch.nn.Module):
    """Chunk ``k`` (k-th call) is ``[[100 k + 10 i + image value]]`` for steps i: shows when and from what it plans."""

    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="openvla", action_horizon=horizon, action_dim=1)
        self.device, self.calls = torch.device("cpu"), 0

    def predict_action(self, pixel_values):
        chunk = 100 * self.calls + 10 * torch.arange(self.config.action_horizon) + pixel_values[:, None]
        self.calls += 1
        return chunk[..., None].float()


def stub_processor(images, text, state=None):
    """The one processor call shape: per sample, one image per camera."""
    return {"pixel_values": torch.stack([cameras[0].flatten()[0] for cameras in images])}


@pytest.mark.parametrize(("n_action_steps", "expected"), [(None, [0, 10, 20, 103, 113]), (2, [0, 10, 102, 112, 204])])
def test_chunked_policy_replans_every_chunk(n_action_steps, expected):
    model = StubModel(horizon=3)
    policy = ChunkedPolicy(model, stub_processor, {CAMERA: "observation.image"}, n_action_steps=n_action_steps)
    actions = []
    for step in range(5):
        observation = {"observation.image": torch.full((1, 3, 4, 4), float(step)), "task": ["go"]}
        action = policy.select_action(observation)
        assert action.shape == (1, 1)
        actions.append(int(action.item()))
    assert actions == expected  # a new chunk every n_action_steps, from the observation of that step
    calls = model.calls
    policy.reset()  # a new episode starts with a new chunk, even mid-chunk
    assert policy.select_action({"observation.image": torch.zeros(1, 3, 4, 4), "task": ["go"]}).item() == 100 * calls
    with pytest.raises(ValueError, match="n_action_steps must be in 1..3"):
        ChunkedPolicy(model, stub_processor, {CAMERA: "observation.image"}, n_action_steps=4)


@pytest.mark.parametrize(
    ("state_indices", "expected"),
    [(None, [111.0, 211.0]), ([2, 0], [11.0, 11.0])],  # with state_indices the last dim the model sees is env dim 0
)
def test_chunked_policy_gives_pi05_the_state_and_every_camera(state_indices, expected):
    class StubPi05(torch.nn.Module):
        config = SimpleNamespace(
            model_type="pi05", action_horizon=2, action_dim=1, state_dim=len(state_indices or [0] * 3),
            state_indices=state_indices,
        )  # fmt: skip
        device = torch.device("cpu")

        def predict_action(self, state, images):  # the last state dim plus the cameras' first pixels
            return (state[:, -1] + images.sum(-1))[:, None, None].repeat(1, 2, 1)

    def processor(images, text, state):
        return {"state": state, "images": torch.stack([torch.stack([i.flatten()[0] for i in s]) for s in images])}

    policy = ChunkedPolicy(StubPi05(), processor, {"cam_a": "observation.images.a", "cam_b": "observation.images.b"})
    observation = {
        "observation.images.a": torch.ones(2, 3, 4, 4),
        "observation.images.b": torch.full((2, 3, 4, 4), 10.0),
        "observation.state": torch.tensor([[0.0, 0.0, 100.0], [0.0, 0.0, 200.0]]),
        "task": ["go", "go"],
    }
    assert policy.select_action(observation).flatten().tolist() == expected


def test_lerobot_eval_policy_runs_the_model_with_known_success(tiny_model, tmp_path):
    from lerobot.envs import make_env, make_env_config, make_env_pre_post_processors

    register_env_config()
    model, processor = load(tiny_model)
    env_cfg = make_env_config("fake_reach")
    envs = make_env(env_cfg, n_envs=2)
    FakeReach.actions.clear()
    policy = ChunkedPolicy(model, processor, {CAMERA: "observation.image"})
    info = evaluate_closed_loop(
        policy, envs, make_env_pre_post_processors(env_cfg, None), 4, videos_dir=tmp_path, max_episodes_rendered=1
    )

    overall = info["overall"]
    assert overall["n_episodes"] == 4 and overall["pc_success"] == 50.0  # seeds 0 and 2 of 0..3
    assert info["per_task"][0]["metrics"]["successes"] == [True, False, True, False]
    # The first two actions of seed 1 are the chunk the model predicts from its first observation.
    first = FakeReach(render_mode="rgb_array")
    observation, _ = first.reset(seed=1)
    image = torch.from_numpy(observation["pixels"]).permute(2, 0, 1).float() / 255
    chunk = model.predict_action(**processor(images=[image], text=[first.task_description]))[0]
    taken = [a for seed, _, a in sorted(FakeReach.actions, key=lambda x: x[:2]) if seed == 1][:HORIZON]
    np.testing.assert_allclose(np.stack(taken), chunk.numpy(), rtol=1e-5)

    import av

    (video,) = overall["video_paths"]
    assert Path(video) == tmp_path / "fake_reach_0/eval_episode_0.mp4"
    with av.open(video) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == SUCCESS_STEP and frames[0].shape == (64, 64, 3)  # LeRobot keeps reset + steps before done


def test_rollout_script_writes_results_card_and_checks_the_env(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    from vla_recipes.configs import RecipeError

    register_env_config()
    rollout = load_script("rollout")
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--env", "fake_reach", "--n_episodes", "2", "--output_dir", str(out)]
    for _ in range(2):  # a re-run replaces the card's figures
        rollout.main([*args, "--videos", "0"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["closed_loop_success_rate"] == 0.5 and results["closed_loop_n_episodes"] == 2
    assert json.loads((out / "rollout_results.json").read_text())["overall"]["pc_success"] == 50.0
    metrics = [
        (r.task_name, r.metric_type, r.metric_value) for r in ModelCard.load(out / "README.md").data.eval_results
    ]
    assert metrics.count(("closed-loop rollout", "closed_loop_success_rate", 0.5)) == 1
    assert len(metrics) == 3
    assert (out / "README.md").read_text().count("---\n") == 2  # one metadata block

    with pytest.raises(RecipeError, match="--camera_map must map each of"):
        rollout.main([*args, "--camera_map", f"{CAMERA}=observation.images.top"])
    with pytest.raises(RecipeError, match="is not registered"):
        rollout.main([*args, "--env", "no_such_env"])


def test_rollout_against_a_served_model_gives_the_in_process_numbers(tiny_model, tmp_path):
    """``--server``: the same episodes, the same actions, the same success as the model run in-process."""
    from test_serve import running

    from vla_recipes.serving import ObservationSpec, PolicyServer, ServedPolicy

    register_env_config()
    rollout = load_script("rollout")
    args = ["--env", "fake_reach", "--n_episodes", "4", "--batch_size", "2", "--videos", "0"]
    runs = {}
    for name in ("in-process", "served"):
        FakeReach.actions.clear()
        out = ["--output_dir", str(tmp_path / name)]
        if name == "in-process":
            info = rollout.main([*args, *out, "--model", str(tiny_model)])
        else:
            model, processor = load(tiny_model)
            server = PolicyServer(ServedPolicy(model, processor, ObservationSpec(model.config)), port=0)
            with running(server):
                info = rollout.main([*args, *out, "--server", f"ws://127.0.0.1:{server.port}"])
        runs[name] = info, sorted(FakeReach.actions, key=lambda x: x[:2])
    (local, local_actions), (remote, remote_actions) = runs.values()
    assert remote["overall"]["pc_success"] == local["overall"]["pc_success"] == 50.0
    assert [a[:2] for a in remote_actions] == [a[:2] for a in local_actions] and len(local_actions) > 8
    np.testing.assert_allclose(np.stack([a[2] for a in remote_actions]), np.stack([a[2] for a in local_actions]))
    results = json.loads((tmp_path / "served/eval_results.json").read_text())
    assert results["closed_loop_success_rate"] == 0.5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gym_pusht") is None, reason="needs gym-pusht: pip install -e '.[sim]'")
def test_pusht_end_to_end(tiny_model, tmp_path):
    command = [sys.executable, str(ROOT / "recipes/rollout.py"), "--env", "pusht", "--n_episodes", "2"]
    command += ["--env_kwargs", '{"episode_length": 8}', "--output_dir", str(tmp_path / "out")]
    result = run([*command, "--model", str(tiny_model)], timeout=300)
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: the model predicts 7-dim actions but the 'pusht' env takes 2-dim ones")
    )

    # The tiny model cut to PushT's 2 action dims: it runs, whatever its (random) success.
    config = json.loads((tiny_model / "config.json").read_text())
    stats = config["norm_stats"]["local/synthetic_reach"]["action"]
    config["norm_stats"]["local/synthetic_reach"]["action"] = {k: v[:2] for k, v in stats.items()}
    config["action_dim"] = 2
    cut = tmp_path / "model2"
    cut.mkdir()
    for path in tiny_model.iterdir():
        (cut / path.name).write_bytes(path.read_bytes())
    (cut / "config.json").write_text(json.dumps(config))
    result = run([*command, "--model", str(cut), "--videos", "1"], timeout=300)
    assert result.returncode != 0  # PushT has no language: the model's prompt must be given
    assert "error: the env gives no task instruction" in result.stderr.strip().splitlines()[-1]  # after a progress bar
    result = run([*command, "--model", str(cut), "--videos", "1", "--instruction", "push the T"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out/eval_results.json").read_text())
    assert results["closed_loop_n_episodes"] == 2 and 0 <= results["closed_loop_success_rate"] <= 1
    assert (tmp_path / "out/videos/pusht_0/eval_episode_0.mp4").stat().st_size > 0
