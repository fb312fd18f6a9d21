"""A small, learnable LeRobot v3.0 dataset written locally (tests, the demo, benchmarks; no network).

Each episode is a 2-D reaching task: a red cube sits at a random spot on a grey table, a blue
gripper starts elsewhere and moves towards it. The action is what the image shows: the gripper's
step towards the cube (dx, dy), three dims that are fixed functions of it (so every dim is learnable
from the image), a constant and a gripper command that closes (+1) once the cube is reached (-1
before). The state is the gripper position and the gripper command, padded to LIBERO's 8 dims.
So a policy that looks at the image can drive the loss down; one that does not, cannot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_CAMERAS = ("observation.images.image",)
TASK = "move the gripper to the red cube"
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
STATE_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper", "pad"]
_STEP = 0.25  # fraction of the remaining distance covered per frame
_REACHED = 0.08  # distance (in [-1, 1] table units) under which the gripper closes


def _render(size: int, cube: np.ndarray, gripper: np.ndarray, wrist: bool) -> np.ndarray:
    """Draw the scene (HWC uint8). The wrist view is centred on the gripper and zoomed 2x."""
    img = np.full((size, size, 3), 110, dtype=np.uint8)
    scale, origin = (size / 2, np.zeros(2)) if not wrist else (size, gripper)
    half = max(2, size // 12) * (2 if wrist else 1)

    def square(center: np.ndarray, color: tuple[int, int, int], half: int) -> None:
        cx, cy = ((center - origin) * scale + size / 2).astype(int)
        img[max(cy - half, 0) : max(cy + half, 0), max(cx - half, 0) : max(cx + half, 0)] = color

    square(cube, (220, 30, 30), half)
    square(gripper, (30, 60, 220), max(1, half // 2))
    return img


def _episode(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cube position, gripper positions (length, 2) and actions (length, 7) of one episode."""
    cube = rng.uniform(-0.7, 0.7, size=2)
    gripper = rng.uniform(-0.9, 0.9, size=2)
    positions, actions = [], []
    for _ in range(length):
        delta = _STEP * (cube - gripper)
        close = 1.0 if np.linalg.norm(cube - gripper) < _REACHED else -1.0
        positions.append(gripper.copy())
        actions.append([delta[0], delta[1], -delta[0], 0.5 * delta[1], delta[0] + delta[1], 0.1, close])
        gripper = gripper + delta
    return cube, np.asarray(positions), np.asarray(actions, dtype=np.float32)


def make_synthetic_dataset(
    root: str | Path,
    *,
    repo_id: str = "local/synthetic_reach",
    num_episodes: int = 20,
    episode_length: int = 30,
    image_size: int = 96,
    cameras: tuple[str, ...] = DEFAULT_CAMERAS,
    fps: int = 10,
    seed: int = 0,
    tasks: tuple[str, ...] = (TASK,),
):
    """Write the dataset to ``root`` (which must not exist) and return the ``LeRobotDataset``.

    Cameras whose key contains ``wrist`` render the gripper-centred view, the others the table view. Episode ``e``
    is labelled ``tasks[e % len(tasks)]`` (several tasks: for task selection).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        **{
            cam: {"dtype": "video", "shape": (image_size, image_size, 3), "names": ["height", "width", "channels"]}
            for cam in cameras
        },
        "observation.state": {"dtype": "float32", "shape": (len(STATE_NAMES),), "names": STATE_NAMES},
        "action": {"dtype": "float32", "shape": (len(ACTION_NAMES),), "names": ACTION_NAMES},
    }
    dataset = LeRobotDataset.create(
        repo_id, fps=fps, features=features, root=root, robot_type="synthetic", use_videos=True
    )
    rng = np.random.default_rng(seed)
    for e in range(num_episodes):
        task = tasks[e % len(tasks)]
        cube, positions, actions = _episode(rng, episode_length)
        for pos, action in zip(positions, actions, strict=True):
            state = np.zeros(len(STATE_NAMES), dtype=np.float32)
            state[:2], state[6] = pos, action[6]
            frame = {cam: _render(image_size, cube, pos, "wrist" in cam) for cam in cameras}
            dataset.add_frame({**frame, "observation.state": state, "action": action, "task": task})
        dataset.save_episode()
    dataset.finalize()
    return dataset


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic reaching dataset (LeRobot v3.0).")
    parser.add_argument("--root", required=True, help="Folder to create.")
    parser.add_argument("--repo_id", default="local/synthetic_reach")
    parser.add_argument("--num_episodes", type=int, default=20)
    parser.add_argument("--episode_length", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--cameras", nargs="+", default=list(DEFAULT_CAMERAS))
    cli = parser.parse_args()
    ds = make_synthetic_dataset(
        cli.root,
        repo_id=cli.repo_id,
        num_episodes=cli.num_episodes,
        episode_length=cli.episode_length,
        image_size=cli.image_size,
        cameras=tuple(cli.cameras),
    )
    print(f"wrote {ds.meta.total_episodes} episodes, {ds.meta.total_frames} frames to {cli.root}")
