"""Closed-loop rollouts of a saved policy in a LeRobot gym environment: the env, the model-env match, the run.

The environments, their observation processing and the evaluation loop are LeRobot's own
(``lerobot.envs.make_env_config`` / ``make_env`` / ``make_env_pre_post_processors`` and ``eval_policy``); the model
takes part as a :class:`vla_recipes.evaluation.ChunkedPolicy`, a served model as a
:class:`vla_recipes.serving.RemoteChunkedPolicy`, and MetaWorld's scripted expert or a random policy as a baseline
through the same loop and seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from vla_recipes.configs import RecipeError
from vla_recipes.evaluation import CLOSED_LOOP_TASK, ChunkedPolicy, evaluate_closed_loop, update_eval_results
from vla_recipes.hub import add_card_results

CLOSED_LOOP_PREFIX = "closed_loop_"  # the keys of eval_results.json a rollout writes


def env_config(env: str, env_kwargs: str | dict):
    """LeRobot's ``EnvConfig`` of an env type (``pusht``, ``libero``, ``metaworld_sized``, ...) with ``env_kwargs``
    (a dict, or JSON as the command line gives it)."""
    from lerobot.envs import make_env_config

    import vla_recipes.envs.metaworld  # noqa: F401  (registers the metaworld_sized env type)

    try:
        kwargs = json.loads(env_kwargs) if isinstance(env_kwargs, str) else env_kwargs
        return make_env_config(env, **kwargs)
    except json.JSONDecodeError as e:
        raise RecipeError(f"--env_kwargs is not JSON: {e}") from None
    except (ValueError, TypeError) as e:  # unknown env type, unknown field
        raise RecipeError(f"--env {env} --env_kwargs {env_kwargs}: {e}") from None


def match_env(config, env_cfg, camera_map: str | None) -> dict[str, str]:
    """Check the model against the env (actions, cameras, state) and return model camera -> observation key."""
    from lerobot.utils.constants import ACTION, OBS_STATE

    from vla_recipes.envs import env_camera_keys

    features = {env_cfg.features_map.get(key, key): ft for key, ft in env_cfg.features.items()}
    env_action = features[ACTION].shape[0]
    if env_action != config.action_dim:
        raise RecipeError(
            f"the model predicts {config.action_dim}-dim actions but the {env_cfg.type!r} env takes {env_action}-dim "
            "ones; roll out a model fine-tuned on this env's data"
        )
    cameras = env_camera_keys(env_cfg)
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


def rollout(
    env: str,
    output_dir: str | Path,
    *,
    model: str | None = None,
    server: str | None = None,
    api_key: str | None = None,
    baseline: str | None = None,
    env_kwargs: str | dict = "{}",
    n_episodes: int = 10,
    batch_size: int = 1,
    seed: int = 0,
    videos: int = 0,
    n_action_steps: int | None = None,
    instruction: str | None = None,
    camera_map: str | None = None,
    device: str = "cpu",
) -> tuple[dict, dict]:
    """Roll out ``model`` (a folder or Hub id, in this process), the model served at ``server`` (``ws://host:port``)
    or a ``baseline`` (``expert`` / ``random``) for ``n_episodes`` in ``batch_size`` envs at a time.

    The model is checked against the env (actions, cameras, state) before the envs or the weights load. Writes
    ``rollout_results.json`` (LeRobot's per-task and overall figures), the first ``videos`` episodes per task under
    ``videos/`` and ``closed_loop_*`` keys into ``eval_results.json`` and (for a model) its card, all in
    ``output_dir``. Returns LeRobot's figures and the summary written to ``eval_results.json``.
    """
    from lerobot.envs import make_env, make_env_pre_post_processors
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from vla_recipes.serving import PolicyClient, RemoteChunkedPolicy

    if sum(x is not None for x in (model or server, baseline)) != 1:
        raise RecipeError("pass --model (in-process), --server ws://host:port (a served model) or --baseline")
    env_cfg = env_config(env, env_kwargs)
    out = Path(output_dir)
    # With a server, ``model`` only names the card the results go to; the served model is what runs.
    client = PolicyClient(server, api_key=api_key, connections=batch_size) if server else None
    try:
        cameras = None
        if not baseline:
            config = client.config if client else AutoConfig.from_pretrained(model)
            cameras = match_env(config, env_cfg, camera_map)
        try:
            envs = make_env(env_cfg, n_envs=batch_size)
        except ModuleNotFoundError as e:
            raise RecipeError(f"the {env!r} env needs a package that is not installed ({e}); "
                              "pip install -e '.[sim]'") from None  # fmt: skip
        options = {"n_action_steps": n_action_steps, "task": instruction}
        if baseline:
            policy = baseline_policy(baseline, envs, seed)
        elif client:
            policy = RemoteChunkedPolicy(client, cameras, **options)
        else:
            loaded = AutoModel.from_pretrained(model).to(device).eval()
            policy = ChunkedPolicy(loaded, AutoProcessor.from_pretrained(model), cameras, **options)
        info = evaluate_closed_loop(
            policy,
            envs,
            make_env_pre_post_processors(env_cfg, None),
            n_episodes,
            videos_dir=out / "videos",
            max_episodes_rendered=videos,
            start_seed=seed,
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
        "env": env,
        "env_task": env_cfg.task,
    }
    update_eval_results(out, CLOSED_LOOP_PREFIX, results | ({"baseline": baseline} if baseline else {}))
    if model:
        scalars = {
            CLOSED_LOOP_PREFIX + k: float(v)
            for k, v in results.items()
            if k in ("success_rate", "avg_sum_reward", "avg_max_reward")
        }
        name = f"{env}/{env_cfg.task}" if env_cfg.task else env
        add_card_results(out, scalars, task=CLOSED_LOOP_TASK, dataset=name, section="Closed-loop evaluation")
    return info, results
