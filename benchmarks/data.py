"""Training-data throughput: LeRobot's per-sample video decoding against the frame cache, and the decode ceiling.

    BENCH_THREADS=1 python benchmarks/data.py [--root data/bench_480x640] [--seconds 10] [--rounds 3]

Generates the dataset the first time (hundreds of episodes of 480x640 AV1 video, written by LeRobot's own
writer with its default encoder, under the git-ignored ``data/``), builds the frame cache in a fresh temporary
folder (timed), then measures in interleaved rounds, with the same shuffled DataLoader (batch 8, 2 workers,
action chunks of 10):

- LeRobot's ``LeRobotDataset``;
- ``VLADataset`` with ``frame_cache: false`` (our per-sample path, LeRobot underneath);
- ``VLADataset`` with the default frame cache at OpenVLA's input (224x224);

against the ceiling: the same video decoded sequentially with PyAV (threaded, to RGB). Rates are samples per
second of wall clock and per CPU-second (main process + workers: robust to other load on the machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from _common import ROOT, machine
from PIL import Image
from torch.utils.data import DataLoader

CAMERA = "observation.images.image"
REPO_ID = "local/bench_480x640"
TEXTURE_SCALES = (8, 32, 128)  # pixels per noise sample


def generate(root: Path, episodes: int, length: int, fps: int = 10) -> None:
    """Episodes of a textured scene under a slowly panning camera with moving objects (realistic bitrate)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        CAMERA: {"dtype": "video", "shape": (480, 640, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (8,), "names": None},
        "action": {"dtype": "float32", "shape": (7,), "names": None},
    }
    dataset = LeRobotDataset.create(REPO_ID, fps=fps, features=features, root=root, streaming_encoding=True)
    rng = np.random.default_rng(0)
    # Smooth noise at several scales: a table-like texture, larger than the view so the camera can pan.
    texture = sum(
        np.asarray(Image.fromarray(rng.integers(0, 85, (720 // s, 960 // s, 3), dtype=np.uint8)).resize((960, 720)))
        for s in TEXTURE_SCALES
    ).astype(np.uint8)
    for episode in range(episodes):
        start, drift = rng.integers(0, 200, 2), rng.uniform(-2, 2, 2)
        objects, velocities = rng.uniform([40, 40], [440, 600], (3, 2)), rng.normal(0, 3, (3, 2))
        colors = rng.integers(0, 256, (3, 3))
        for t in range(length):
            y0, x0 = (start + drift * t).astype(int) % 200
            frame = texture[y0 : y0 + 480, x0 : x0 + 640].copy()
            for (cy, cx), color in zip((objects + t * velocities).astype(int), colors, strict=True):
                frame[max(cy - 25, 0) : max(cy + 25, 0), max(cx - 25, 0) : max(cx + 25, 0)] = color
            action = rng.normal(size=7).astype(np.float32)
            state = np.concatenate([action, [episode]]).astype(np.float32)
            dataset.add_frame({CAMERA: frame, "observation.state": state, "action": action, "task": "pick the cube"})
        dataset.save_episode()
    dataset.finalize()


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time of a process and its live children (DataLoader workers)."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure_loader(dataset, batch_size: int, workers: int, seconds: float, seed: int) -> tuple[float, float]:
    """(samples/s wall, samples per CPU-second) of a shuffled DataLoader over ``seconds`` after its first batch."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator)
    me = psutil.Process()
    iterator = iter(loader)
    next(iterator)  # workers started and warm
    samples, start, cpu = 0, time.perf_counter(), cpu_seconds(me)
    while time.perf_counter() - start < seconds:
        try:
            samples += len(next(iterator)["task"])
        except StopIteration:
            iterator = iter(loader)
    wall, cpu = time.perf_counter() - start, cpu_seconds(me) - cpu
    del iterator
    return samples / wall, samples / cpu


def measure_decode(video: Path, seconds: float) -> tuple[float, float]:
    """(frames/s wall, frames per CPU-second) of PyAV decoding the file front to back, threaded, to RGB."""
    import av

    frames, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
                frames += 1
                if time.perf_counter() - start >= seconds:
                    break
    return frames / (time.perf_counter() - start), frames / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT / "data" / "bench_480x640"), help="Dataset folder (made if absent).")
    parser.add_argument("--episodes", type=int, default=200, help="Episodes to generate.")
    parser.add_argument("--length", type=int, default=40, help="Frames per generated episode.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of one measurement.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (medians are reported).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--horizon", type=int, default=10, help="Action chunk length.")
    cli = parser.parse_args()

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from vla_recipes.configs import DataArguments
    from vla_recipes.data.frame_cache import FrameResize
    from vla_recipes.data.lerobot import VLADataset, load_metadata

    root = Path(cli.root)
    if not (root / "meta" / "info.json").is_file():
        print(f"generating {cli.episodes} episodes x {cli.length} frames of 480x640 video in {root} ...", flush=True)
        start = time.perf_counter()
        generate(root, cli.episodes, cli.length)
        print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    videos = sorted((root / "videos").rglob("*.mp4"))
    with tempfile.TemporaryDirectory(prefix="frame_cache_bench_") as cache_dir:
        args = dict(
            dataset_repo_id=REPO_ID, dataset_root=str(root), action_horizon=cli.horizon, frame_cache_dir=cache_dir
        )
        meta = load_metadata(DataArguments(**args))
        codec = meta.features[CAMERA]["info"]["video.codec"]
        print(
            f"dataset: {meta.total_episodes} episodes, {meta.total_frames} frames, "
            f"{sum(v.stat().st_size for v in videos) / 2**20:.0f} MiB of {codec} "
            f"video; load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}",
            flush=True,
        )
        episodes = list(range(meta.total_episodes))
        resize = FrameResize("square_bicubic", 224)  # OpenVLA's input
        start, cpu = time.perf_counter(), time.process_time()
        cached = VLADataset(meta, DataArguments(**args), [CAMERA], episodes, frame_resize=resize)
        build_wall, build_cpu = time.perf_counter() - start, time.process_time() - cpu
        size = sum(p.stat().st_size for p in Path(cache_dir).glob("*.npy"))
        print(
            f"cache build: {build_wall:.1f} s wall ({meta.total_frames / build_wall:.0f} frames/s), "
            f"{build_cpu:.1f} CPU-s ({meta.total_frames / build_cpu:.0f} frames per CPU-s), {size / 2**20:.0f} MiB",
            flush=True,
        )
        plain = VLADataset(meta, DataArguments(**args, frame_cache=False), [CAMERA], episodes)
        lerobot = LeRobotDataset(
            REPO_ID,
            root=root,
            delta_timestamps={"action": [i / meta.fps for i in range(cli.horizon)]},
            video_backend="pyav",
        )
        paths = {
            "LeRobot `LeRobotDataset`": lerobot,
            "`VLADataset`, `frame_cache: false`": plain,
            "`VLADataset` default (frame cache, 224²)": cached,
        }
        results: dict[str, list[tuple[float, float]]] = {"ceiling": [], **{name: [] for name in paths}}
        for round_ in range(cli.rounds):
            results["ceiling"].append(measure_decode(videos[0], cli.seconds))
            for name, dataset in paths.items():
                results[name].append(measure_loader(dataset, cli.batch_size, cli.workers, cli.seconds, seed=round_))
            print(f"round {round_ + 1}: " + ", ".join(f"{r[-1][0]:.0f}" for r in results.values()), flush=True)
        uss = psutil.Process().memory_full_info().uss

    median = {name: tuple(statistics.median(r[k] for r in runs) for k in (0, 1)) for name, runs in results.items()}
    base, ceiling = median["LeRobot `LeRobotDataset`"], median["ceiling"]
    print(
        f"\n{machine()}\nbatch {cli.batch_size}, shuffled, {cli.workers} workers, action chunk {cli.horizon}; "
        f"medians of {cli.rounds} interleaved rounds of {cli.seconds:.0f} s\n"
    )
    print("| path | samples/s (wall) | vs LeRobot | of ceiling | per CPU-s | vs LeRobot | of ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (wall, per_cpu) in median.items():
        label = "sequential PyAV decode (ceiling, frames)" if name == "ceiling" else name
        print(
            f"| {label} | {wall:.0f} | {wall / base[0]:.1f}× | {wall / ceiling[0]:.2f} "
            f"| {per_cpu:.0f} | {per_cpu / base[1]:.1f}× | {per_cpu / ceiling[1]:.2f} |"
        )
    print(f"\nmain process private memory at the end: {uss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
