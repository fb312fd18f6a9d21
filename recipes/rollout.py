"""Closed-loop rollouts of a saved policy in a LeRobot gym environment: success rate, rewards and videos.

    pip install -e ".[sim]"     # gym-pusht: PushT runs on a CPU
    python recipes/rollout.py --model outputs/pusht-pi05 --env pusht --n_episodes 50 --batch_size 10
    python recipes/rollout.py --model me/openvla-libero --env libero --env_kwargs '{"task": "libero_spatial"}'
    python recipes/rollout.py --model outputs/pusht-pi05 --server ws://gpu-box:8000 --env pusht  # recipes/serve.py
    MUJOCO_GL=egl python recipes/rollout.py --model outputs/demo-sim-pi05 --env metaworld_sized \
        --env_kwargs '{"task": "reach-v3", "image_size": 112}' --n_episodes 50
    MUJOCO_GL=egl python recipes/rollout.py --baseline expert --output_dir outputs/expert --env metaworld_sized ...

The environments, their observation processing and the evaluation loop are LeRobot's own
(``lerobot.envs.make_env_config`` / ``make_env`` / ``make_env_pre_post_processors`` and ``eval_policy``); the
model takes part as a :class:`vla_recipes.evaluation.ChunkedPolicy`: it predicts a chunk of
``action_horizon`` actions, executes ``--n_action_steps`` of them, then re-plans from the new observation.
``--baseline expert`` (MetaWorld's scripted expert) or ``--baseline random`` (uniform actions) run in place of a
model through the same loop and seeds: the figures a model's success rate is read against.

Writes ``<output_dir>/rollout_results.json`` (LeRobot's per-task and overall figures), videos of the first
``--videos`` episodes under ``<output_dir>/videos/<suite>_<task>/eval_episode_<i>.mp4``, ``closed_loop_*`` keys
into ``eval_results.json`` and the model card (a re-run replaces them).

With ``--server ws://host:port`` the chunks come from a model served by ``recipes/serve.py`` (one connection per env
of the batch, answered by one batched call); ``--model`` then only names the folder the results go to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

import vla_recipes  # noqa: F401  (registers the models with the Auto classes)
from vla_recipes.configs import RecipeError
from vla_recipes.evaluation import (
    CLOSED_LOOP_TASK,
    ChunkedPolicy,
    default_output_dir,
    evaluate_closed_loop,
    update_eval_results,
)
from vla_recipes.hub import add_card_results
from vla_recipes.serving import PolicyClient, RemoteChunkedPolicy

PREFIX = "closed_loop_"


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Output folder or Hub id of a fine-tuned model.")
    parser.add_argument(
        "--server", default=None, help="ws://host:port of recipes/serve.py: roll out the served model instead."
    )
    parser.add_argument("--api_key", default=None, help="The server's api key, if it has one.")
    parser.add_argument("--baseline", choices=["expert", "random"], help="A scripted policy instead of a model.")
    parser.add_argument("--env", required=True, help="A LeRobot env type: pusht, libero, metaworld, aloha, ...")
    parser.add_argument("--env_kwargs", default="{}", help='JSON fields of its EnvConfig, e.g. \'{"task": "..."}\'.')
    parser.add_argument("--n_episodes", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=1, help="Environments stepped together (one batch).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first episode (then +1 per episode).")
    parser.add_argument("--videos", type=int, default=2, help="Record a video of the first N episodes per task.")
    parser.add_argument("--n_action_steps", type=int, default=None, help="Actions run per chunk (default: all).")
    parser.add_argument("--instruction", default=None, help="Task prompt (default: the env's task description).")
    parser.add_argument(
        "--camera_map", default=None, help="model_key=observation_key,... (default: same names, else in order)."
    )
    parser.add_argument("--output_dir", default=None, help="Where results go (default: --model when it is a folder).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli = parser.parse_args(args)
    if cli.baseline and (cli.model or cli.server):
        parser.error("--baseline runs a scripted policy: give it without --model and --server")
    if cli.baseline and not cli.output_dir:
        parser.error("--baseline needs --output_dir")
    return cli


def env_config(env: str, env_kwargs: str):
    from lerobot.envs import make_env_config

    import vla_recipes.envs.metaworld  # noqa: F401  (registers the metaworld_sized env type)

    try:
        return make_env_config(env, **json.loads(env_kwargs))
    except json.JSONDecodeError as e:
        raise RecipeError(f"--env_kwargs is not JSON: {e}") from None
    except (ValueError, TypeError) as e:  # unknown env type, unknown field
        raise RecipeError(f"--env {env} --env_kwargs {env_kwargs}: {e}") from None


def match_env(config, env_cfg, camera_map: str | None) -> dict[str, str]:
    """Check the model against the env (actions, cameras, state) and return model camera -> observation key."""
    from lerobot.configs import FeatureType
    from lerobot.utils.constants import ACTION, OBS_STATE

    features = {env_cfg.features_map.get(key, key): ft for key, ft in env_cfg.features.items()}
    env_action = features[ACTION].shape[0]
    if env_action != config.action_dim:
        raise RecipeError(
            f"the model predicts {config.action_dim}-dim actions but the {env_cfg.type!r} env takes {env_action}-dim "
            "ones; roll out a model fine-tuned on this env's data"
        )
    cameras = [key for key, ft in features.items() if ft.type is FeatureType.VISUAL]
    if camera_map:
        mapping = dict(item.split("=", 1) for item in camera_map.split(","))
    elif set(config.camera_keys) <= set(cameras):
        mapping = {key: key for key in config.camera_keys}
    elif len(config.camera_keys) == len(cameras):
        mapping = dict(zip(config.camera_keys, cameras, strict=True))
    else:
        raise RecipeError(
            f"the model sees cameras {list(config.camera_keys)} and the env gives {cameras}; pass --camera_map "
            "model_key=observation_key,..."
        )
    unknown = [key for key in mapping.values() if key not in cameras]
    if sorted(mapping) != sorted(config.camera_keys) or unknown:
        raise RecipeError(f"--camera_map must map each of {list(config.camera_keys)} to one of {cameras}")
    state_dim, indices = getattr(config, "state_dim", None), getattr(config, "state_indices", None)
    env_dim = features[OBS_STATE].shape[0] if OBS_STATE in features else None
    if state_dim is not None and env_dim is not None:
        if indices is not None and max(indices) >= env_dim:  # the model sees dims state_indices of the env's state
            raise RecipeError(
                f"the model was trained on state dims {list(indices)} but the {env_cfg.type!r} env gives "
                f"{env_dim}-dim {OBS_STATE}"
            )
        if indices is None and env_dim != state_dim:
            raise RecipeError(
                f"the model takes a {state_dim}-dim state but the {env_cfg.type!r} env gives {env_dim}-dim {OBS_STATE}"
            )
    return {key: mapping[key] for key in config.camera_keys}  # in the model's camera order


def baseline_policy(kind: str, envs: dict, seed: int):
    """The scripted expert or a random policy over the one vector env of ``envs`` (a baseline runs one task)."""
    from vla_recipes.envs.metaworld import ScriptedPolicy

    vector_envs = [env for tasks in envs.values() for env in tasks.values()]
    if len(vector_envs) != 1:
        raise RecipeError(f"--baseline runs one task at a time; this env config builds {len(vector_envs)}")
    if kind == "expert" and not hasattr(vector_envs[0].envs[0], "expert_policy"):
        raise RecipeError("--baseline expert needs an env with a scripted expert (metaworld_sized)")
    return ScriptedPolicy(kind, vector_envs[0], seed=seed)


def main(args: list[str] | None = None) -> dict:
    from lerobot.envs import make_env, make_env_pre_post_processors

    cli = parse_args(args)
    if cli.model is None and cli.server is None and cli.baseline is None:
        raise RecipeError("pass --model (in-process), --server ws://host:port (a served model) or --baseline")
    env_cfg = env_config(cli.env, cli.env_kwargs)
    out = Path(cli.output_dir) if cli.output_dir else default_output_dir(cli.model or "served")
    # With --server, --model only names the folder the results go to; the served model is what runs.
    client = PolicyClient(cli.server, api_key=cli.api_key, connections=cli.batch_size) if cli.server else None
    try:
        camera_map = None
        if not cli.baseline:
            config = client.config if client else AutoConfig.from_pretrained(cli.model)
            camera_map = match_env(config, env_cfg, cli.camera_map)
        try:
            envs = make_env(env_cfg, n_envs=cli.batch_size)
        except ModuleNotFoundError as e:
            raise RecipeError(f"the {cli.env!r} env needs a package that is not installed ({e}); "
                              "pip install -e '.[sim]'") from None  # fmt: skip
        options = {"n_action_steps": cli.n_action_steps, "task": cli.instruction}
        if cli.baseline:
            policy = baseline_policy(cli.baseline, envs, cli.seed)
        elif client:
            policy = RemoteChunkedPolicy(client, camera_map, **options)
        else:
            model = AutoModel.from_pretrained(cli.model).to(cli.device).eval()
            policy = ChunkedPolicy(model, AutoProcessor.from_pretrained(cli.model), camera_map, **options)
        info = evaluate_closed_loop(
            policy,
            envs,
            make_env_pre_post_processors(env_cfg, None),
            cli.n_episodes,
            videos_dir=out / "videos",
            max_episodes_rendered=cli.videos,
            start_seed=cli.seed,
        )
    finally:
        if client:
            client.close()

    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout_results.json").write_text(json.dumps(info, indent=2, default=str))
    overall = info["overall"]
    results = {
        "success_rate": overall["pc_success"] / 100,
        "avg_sum_reward": overall["avg_sum_reward"],
        "avg_max_reward": overall["avg_max_reward"],
        "n_episodes": overall["n_episodes"],
        "env": cli.env,
        "env_task": env_cfg.task,
    }
    update_eval_results(out, PREFIX, results | ({"baseline": cli.baseline} if cli.baseline else {}))
    name = f"{cli.env}/{env_cfg.task}" if env_cfg.task else cli.env
    if cli.model:
        scalars = {
            PREFIX + k: float(v)
            for k, v in results.items()
            if k in ("success_rate", "avg_sum_reward", "avg_max_reward")
        }
        add_card_results(out, scalars, task=CLOSED_LOOP_TASK, dataset=name, section="Closed-loop evaluation")

    print(f"{cli.baseline or cli.model or cli.server} on {name}: success {results['success_rate']:.1%} over "
          f"{results['n_episodes']} episodes, average return {results['avg_sum_reward']:.3f}")  # fmt: skip
    print(f"wrote {out / 'rollout_results.json'}, {len(overall['video_paths'])} videos in {out / 'videos'}")
    return info


if __name__ == "__main__":
    try:
        main()
    except RecipeError as e:
        sys.exit(f"error: {e}")
