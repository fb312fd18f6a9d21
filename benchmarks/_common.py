"""What the benchmarks share: one CPU thread timed in process CPU time, the same samples and tiny models for every peer.

Wall time on a shared 2-core machine swings by several x between runs; the CPU time of a process pinned to
``BENCH_THREADS`` threads (default 1) measures the work itself, and every ratio compares two figures taken in the same
run on the same samples. Import this module before torch so the thread count holds for every library.
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(THREADS)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` from a checkout without `pip install -e .`
CAMERAS = ("observation.images.image", "observation.images.wrist_image")
REPO_ID = "local/synthetic_reach"


def cpu_time(fn: Callable[[], Any]) -> float:
    """Process CPU seconds (user + system, all threads) spent in ``fn()``."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def best_cpu_time(fn: Callable[[], Any], repeats: int) -> float:
    """The least CPU time of ``repeats`` calls after one warm-up call (allocator, lazy inits): the work, not noise."""
    fn()
    return min(cpu_time(fn) for _ in range(repeats))


def machine() -> str:
    """CPU model, core count, threads used, load average and library versions: what a figure was measured on."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    import transformers

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores, BENCH_THREADS={THREADS}, load average {load}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table, so a run's output pastes into benchmarks/RESULTS.md as is."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in row) + " |")
    sys.stdout.flush()


@dataclass
class Data:
    """A synthetic LeRobot dataset (2 cameras, 96x96) and samples read from it once, kept in memory."""

    root: Path
    meta: Any
    samples: list[dict]
    horizon: int


def synthetic_data(folder: Path, horizon: int, num_samples: int) -> Data:
    """``num_samples`` training samples with ``horizon``-step action chunks, written and read the project's way.

    Samples are decoded once up front: the benchmarks time models and training loops, not video decoding
    (benchmarks/data.py does that).
    """
    from vla_recipes.data.lerobot import VLADataset, load_metadata
    from vla_recipes.data.synthetic import make_synthetic_dataset

    root = folder / "synthetic_reach"
    episode_length = 16
    if not (root / "meta" / "info.json").is_file():
        episodes = -(-num_samples // episode_length)
        make_synthetic_dataset(root, num_episodes=episodes, episode_length=episode_length, cameras=CAMERAS)
    data_args = data_arguments(root, horizon)
    meta = load_metadata(data_args)
    dataset = VLADataset(meta, data_args, list(CAMERAS), list(range(meta.total_episodes)))
    return Data(root, meta, [dataset[i] for i in range(num_samples)], horizon)


def seen_by(config, samples: list[dict]) -> list[dict]:
    """The samples with only the cameras the model sees (``config.camera_keys``: OpenVLA one), as ``VLADataset``
    gives them to it in training and the processor's one call shape expects them."""
    return [{**sample, "images": sample["images"][: len(config.camera_keys)]} for sample in samples]


def data_arguments(root: Path, horizon: int):
    from vla_recipes.configs import DataArguments

    return DataArguments(dataset_repo_id=REPO_ID, dataset_root=str(root), action_horizon=horizon, frame_cache=False)


def tiny_config(model_type: str) -> dict:
    """The tests' tiny model of a family, as a recipe's ``model_config``."""
    from vla_recipes.families import get_family

    return {"model_type": model_type, **copy.deepcopy(get_family(model_type).tiny_config)}


def configured_config(model_args, data: Data, cameras: int | None = None, state: bool = True) -> tuple[Any, Any]:
    """(config, family) of ``model_args``'s model with the data's cameras, dims and statistics, as ``recipes/sft.py``
    writes them into the config before loading the weights. ``cameras``: how many of the dataset's cameras it sees
    (default: OpenVLA one, the others all); ``state``: whether it sees the robot state (OpenVLA-OFT's proprio token;
    pi0.5 always does)."""
    from vla_recipes.data.lerobot import dataset_norm_stats
    from vla_recipes.families import get_family
    from vla_recipes.finetuning import load_config

    config = load_config(model_args)
    family = get_family(config.model_type)
    cameras = list(CAMERAS[: cameras or (1 if config.model_type == "openvla" else len(CAMERAS))])
    data_args = data_arguments(data.root, data.horizon)
    norm_mode = family.default_norm_mode(config)
    mask = family.default_action_norm_mask(7) if norm_mode == "bounds_q99" else None
    stats = dataset_norm_stats(data.meta, data_args, norm_mode, mask)
    family.configure(
        config, data_args, cameras, action_dim=7, state_dim=8 if state else None, norm_mode=norm_mode, norm_stats=stats
    )  # fmt: skip
    return config, family


def build_model(
    model_type: str,
    data: Data,
    output_dir: Path,
    finetune_mode: str = "full",
    attn_implementation: str | None = None,
    *,
    model_args: Any = None,
    gradient_checkpointing: bool = False,
    cameras: int | None = None,
    state: bool = True,
) -> tuple[Any, Any, Any]:
    """(model, processor, family) exactly as ``recipes/sft.py`` builds them; ``model_args`` defaults to the tiny
    ``model_config`` recipe of ``model_type`` in ``finetune_mode``."""
    from vla_recipes.configs import ModelArguments
    from vla_recipes.finetuning import apply_finetune_mode, load_model

    if model_args is None:
        model_args = ModelArguments(
            model_config=tiny_config(model_type), finetune_mode=finetune_mode, attn_implementation=attn_implementation
        )
    config, family = configured_config(model_args, data, cameras, state)
    torch.manual_seed(0)
    model = load_model(model_args, config, family.model_class, str(output_dir))
    processor = family.build_processor(model.config, model_args)
    modules_to_save = family.modules_to_save(model)
    model = apply_finetune_mode(model, model_args, gradient_checkpointing, modules_to_save=modules_to_save)
    return model, processor, family
