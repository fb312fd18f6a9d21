"""How much of reach-v3's goal each MetaWorld camera shows as the scripted expert closes in (benchmarks/RESULTS.md).

The goal is a small red sphere and the Sawyer arm is red too: a policy can only stop at the goal if its cameras
still show the goal when the hand is a few centimetres away. For each camera this counts the goal's pixels in every
frame of the expert's episodes (MuJoCo's segmentation rendering: what the goal itself covers), by the hand's
distance to the goal.

    MUJOCO_GL=egl python benchmarks/sim/reach_goal_visibility.py
"""

import mujoco
import numpy as np

from vla_recipes.envs.metaworld import COLLECTION_SEED_START, expert_action, sized_env

CAMERAS = ("corner2", "topview", "gripperPOV", "behindGripper")
BINS = ((0.15, np.inf), (0.10, 0.15), (0.07, 0.10), (0.05, 0.07))  # hand-goal distance (m); success is < 0.05
IMAGE_SIZE = 112
EPISODE_LENGTH = 150  # as the collections and rollouts
EPISODES = 20


def goal_pixels(renderer: mujoco.Renderer, data, goal_site: int) -> list[int]:
    """The goal's visible pixels in each camera, from MuJoCo's segmentation rendering (object id and type a pixel)."""
    counts = []
    for camera in CAMERAS:
        renderer.update_scene(data, camera=camera)
        ids = renderer.render()
        counts.append(int(((ids[..., 0] == goal_site) & (ids[..., 1] == mujoco.mjtObj.mjOBJ_SITE)).sum()))
    return counts


def main() -> None:
    env = sized_env("reach-v3", IMAGE_SIZE, EPISODE_LENGTH)
    rows = []  # (distance, pixels per camera)
    renderer = None
    for seed in range(COLLECTION_SEED_START, COLLECTION_SEED_START + EPISODES):
        env.reset(seed=seed)
        model, data = env._env.model, env._env.data  # LeRobot's wrapper has no public accessor
        if renderer is None:
            renderer = mujoco.Renderer(model, IMAGE_SIZE, IMAGE_SIZE)
            renderer.enable_segmentation_rendering()
        goal_site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
        for _ in range(EPISODE_LENGTH):  # the env itself truncates only at MetaWorld's 500 steps
            distance = float(np.linalg.norm(data.site_xpos[goal_site] - env._env.tcp_center))
            rows.append((distance, goal_pixels(renderer, data, goal_site)))
            _, _, terminated, truncated, _ = env.step(expert_action(env))
            if terminated or truncated:  # success: LeRobot's wrapper ends the episode there
                break
    renderer.close()
    env.close()
    distances = np.array([d for d, _ in rows])
    pixels = np.array([p for _, p in rows])
    first = COLLECTION_SEED_START
    print(f"reach-v3 expert, seeds {first}-{first + EPISODES - 1}, {IMAGE_SIZE} px: the goal's visible pixels")
    print("| hand-goal distance | frames | " + " | ".join(f"{c} median (hidden)" for c in CAMERAS) + " |")
    for low, high in BINS:
        rows_in = (distances >= low) & (distances < high)
        cells = [
            f"{np.median(pixels[rows_in, i]):.0f} ({np.mean(pixels[rows_in, i] == 0):.0%})" for i in range(len(CAMERAS))
        ]
        span = f"over {low * 100:.0f}" if high == np.inf else f"{low * 100:.0f}-{high * 100:.0f}"
        print(f"| {span} cm | {rows_in.sum()} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
