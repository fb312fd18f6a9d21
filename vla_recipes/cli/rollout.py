"""Closed-loop rollouts of a saved policy in a LeRobot gym environment: success rate, rewards and videos.

    pip install -e ".[sim]"     # gym-pusht: PushT runs on a CPU
    python recipes/rollout.py --model outputs/pusht-pi05 --env pusht --n_episodes 50 --batch_size 10
    vla-recipes rollout --model me/openvla-libero --env libero --env_kwargs '{"task": "libero_spatial"}'
    python recipes/rollout.py --model outputs/pusht-pi05 --server ws://gpu-box:8000 --env pusht  # recipes/serve.py
    MUJOCO_GL=egl python recipes/rollout.py --model outputs/demo-sim-pi05 --env metaworld_sized \\
        --env_kwargs '{"task": "reach-v3", "image_size": 112}' --n_episodes 50
    MUJOCO_GL=egl python recipes/rollout.py --baseline expert --output_dir outputs/expert --env metaworld_sized ...

The model predicts a chunk of ``action_horizon`` actions, executes ``--n_action_steps`` of them, then re-plans from
the new observation, inside LeRobot's own envs and ``eval_policy`` loop (:mod:`vla_recipes.closed_loop`).
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

import torch

from vla_recipes.closed_loop import rollout
from vla_recipes.evaluation import default_output_dir


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


def main(args: list[str] | None = None) -> dict:
    cli = parse_args(args)
    out = cli.output_dir or default_output_dir(cli.model or "served")
    options = {k: v for k, v in vars(cli).items() if k not in ("env", "output_dir")}
    info, results = rollout(cli.env, out, **options)
    task = f"{cli.env}/{results['env_task']}" if results["env_task"] else cli.env
    print(f"{cli.baseline or cli.model or cli.server} on {task}: success {results['success_rate']:.1%} over "
          f"{results['n_episodes']} episodes, average return {results['avg_sum_reward']:.3f}")  # fmt: skip
    print(f"wrote {out}/rollout_results.json, {len(info['overall']['video_paths'])} videos in {out}/videos")
    return info
