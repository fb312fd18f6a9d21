"""How often one camera can place reach-v3's goal within the 5 cm success radius (benchmarks/RESULTS.md).

One image fixes a goal only up to its camera ray: without shadows (``metaworld_sized`` turns them off) nothing tells
a goal from another further along the same ray. The best single guess is then the mean of the goal box's points on
that ray (a uniform prior in volume, so weighted by distance squared); this counts how often it lands within 5 cm.
An upper bound for any policy that sees that camera alone, perfect perception assumed.

    MUJOCO_GL=egl python benchmarks/sim/reach_camera_bound.py
"""

import mujoco
import numpy as np

from vla_recipes.envs.metaworld import sized_env

SUCCESS_RADIUS = 0.05


def bound(camera_position: np.ndarray, goals: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    hits = []
    distances = np.linspace(0.0, 3.0, 6001)
    for goal in goals:
        ray = (goal - camera_position) / np.linalg.norm(goal - camera_position)
        points = camera_position + distances[:, None] * ray
        inside = np.all((points >= low) & (points <= high), axis=1)
        weights = distances[inside] ** 2
        guess = (points[inside] * weights[:, None]).sum(0) / weights.sum()
        hits.append(np.linalg.norm(guess - goal) < SUCCESS_RADIUS)
    return float(np.mean(hits))


def main() -> None:
    env = sized_env("reach-v3", 112, 150)
    env.reset(seed=0)  # builds the MuJoCo model with LeRobot's corner2 pose; its render computed the positions
    model, data = env._env.model, env._env.data
    low, high = env._env.goal_space.low, env._env.goal_space.high  # where SawyerReachEnvV3 draws its goals
    goals = np.random.default_rng(0).uniform(low, high, size=(2000, 3))
    for camera in ("corner2", "topview"):
        position = data.cam_xpos[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)]
        share = bound(position, goals, low, high)
        print(f"{camera} at {position.round(3)}: best guess within 5 cm for {share:.1%} of goals")
    env.close()


if __name__ == "__main__":
    main()
