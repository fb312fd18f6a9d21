"""LeRobot datasets as VLA training samples: keys, cameras, action chunks, episode splits, stats.

A sample is a plain dict, the same for every model family (the collators turn it into model
inputs)::

    {"images": [float CHW in [0, 1], one per camera], "state": (state_dim,) or None (``state_indices``' dims),
     "actions": (action_horizon, action_dim), "action_is_pad": (action_horizon,), "task": str,
     "seed": int (the sample's own random draws, see ``sample_seed``)}

Action chunks come from LeRobot's ``delta_timestamps``: ``action_horizon`` future actions at the
dataset's fps; steps past the episode's end repeat its last action and are flagged in
``action_is_pad`` (losses leave them out).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vla_recipes.configs import DataArguments, RecipeError, parse_episodes
from vla_recipes.data.dataset_files import damaged_metadata, fetch_missing
from vla_recipes.data.frame_cache import FrameResize, open_frame_cache
from vla_recipes.data.normalize import default_relative_mask
from vla_recipes.data.state_selection import feature_dim, state_selection
from vla_recipes.data.stats import column_values, data_files, episode_table, norm_stats_entry

logger = logging.getLogger(__name__)


def load_metadata(data_args: DataArguments):
    """The dataset's ``LeRobotDatasetMetadata`` (info, stats, episodes): cheap, no frames loaded."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.utils.constants import HF_LEROBOT_HOME

    root = data_args.dataset_root
    if root is not None and not (Path(root) / "meta" / "info.json").is_file():
        raise RecipeError(
            f"dataset_root={root!r} holds no LeRobot dataset (no meta/info.json); "
            "point it at the dataset folder or drop it to download dataset_repo_id"
        )
    try:
        return LeRobotDatasetMetadata(data_args.dataset_repo_id, root=root, revision=data_args.dataset_revision)
    except Exception as e:
        from lerobot.datasets.utils import BackwardCompatibilityError, ForwardCompatibilityError

        # A local copy with a missing or corrupt metadata file: name it (LeRobot tries the Hub, or fails to parse).
        # Not for another format version, whose files differ (v2.1 has no meta/tasks.parquet): that error says so.
        local = Path(root) if root is not None else HF_LEROBOT_HOME / data_args.dataset_repo_id
        damaged = None
        if not isinstance(e, BackwardCompatibilityError | ForwardCompatibilityError):
            damaged = damaged_metadata(local, data_args.dataset_repo_id)
        if (error := damaged or _metadata_error(e, data_args)) is None:
            raise
        raise error from None


def _metadata_error(e: Exception, data_args: DataArguments) -> RecipeError | None:
    """One line for what LeRobot raises when the dataset cannot be had (or None for anything else)."""
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError
    from lerobot.datasets.utils import BackwardCompatibilityError, ForwardCompatibilityError

    repo, root = data_args.dataset_repo_id, data_args.dataset_root
    if isinstance(e, BackwardCompatibilityError):  # lerobot's own converter; --root converts a local copy in place
        where = f" --root={root} --push-to-hub=false" if root else ""
        return RecipeError(
            f"dataset {repo!r} is in LeRobot's v2.1 format and lerobot reads v3.0: convert it with "
            f"`python -m lerobot.scripts.convert_dataset_v21_to_v30 --repo-id={repo}{where}`"
        )
    if isinstance(e, ForwardCompatibilityError):
        return RecipeError(f"dataset {repo!r} is in a newer LeRobot format than this lerobot reads: upgrade lerobot")
    if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
        return RecipeError(
            f"dataset_repo_id={repo!r} (revision {data_args.dataset_revision or 'default'}) is not on the Hub, or is "
            "private or gated (run `hf auth login`); check the id, or set dataset_root to a local copy"
        )
    offline = isinstance(e, OfflineModeIsEnabled)
    if offline or isinstance(e, OSError) or type(e).__module__.startswith("httpx"):  # network down, DNS, refused
        reason = "HF_HUB_OFFLINE is set" if offline else f"the Hub cannot be reached ({type(e).__name__})"
        return RecipeError(
            f"dataset {repo!r} is not on this machine and {reason}: download it where there is network "
            f"(`hf download {repo} --repo-type dataset`) or set dataset_root to a local copy"
        )
    return None


def resolve_camera_keys(meta, data_args: DataArguments) -> list[str]:
    """Check that every requested feature exists (error lists what does) and return the cameras."""
    cameras = list(meta.camera_keys)
    camera_keys = data_args.camera_keys or cameras[:1]
    if not camera_keys:
        raise RecipeError(f"dataset {data_args.dataset_repo_id!r} has no camera feature; a VLA needs images")
    for key in camera_keys:
        if key not in cameras:
            raise RecipeError(f"camera_keys: {key!r} is not a camera of the dataset; it has {cameras}")
    others = [k for k in meta.features if k not in cameras]
    for name, key in (("state_key", data_args.state_key), ("action_key", data_args.action_key)):
        if key is not None and key not in meta.features:
            raise RecipeError(f"{name}: {key!r} is not a feature of the dataset; it has {others}")
    return camera_keys


def relative_action_mask(data_args: DataArguments, action_dim: int, state_dim: int | None) -> list[bool] | None:
    """The recipe's ``relative_action_mask`` (see ``relative_actions``), checked against the dataset's action and the
    state the model sees, ``state_dim`` (None: no state); None for absolute actions."""
    mask = data_args.relative_action_mask
    if not data_args.relative_actions:
        if mask is not None:
            raise RecipeError("relative_action_mask is set but relative_actions is false; set relative_actions: true")
        return None
    if state_dim is None:
        raise RecipeError(
            "relative_actions: true makes actions relative to the state, but state_key is None; set state_key "
            "(the dataset's state feature) or drop relative_actions"
        )
    mask = default_relative_mask(action_dim) if mask is None else list(mask)
    if len(mask) > action_dim:
        raise RecipeError(
            f"relative_action_mask has {len(mask)} entries but the action {data_args.action_key!r} has {action_dim} "
            "dims; give at most one entry per action dim"
        )
    if (last := max((i for i, m in enumerate(mask) if m), default=-1)) >= state_dim:
        raise RecipeError(
            f"relative_action_mask makes action dim {last} relative, but the state the model sees has {state_dim} "
            "dims (state dim i is subtracted from action dim i); shorten the mask or choose state_indices"
        )
    return mask


def check_episode_data(meta, data_args: DataArguments, episodes: list[int]) -> list[str]:
    """Fail before training on episodes shorter than an action chunk, with NaN/inf actions or states, or with an
    empty task (reads the parquet columns of the run's episodes: no video); names a data file that is missing and
    cannot be downloaded, or is corrupt. Returns the tasks of those episodes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    horizon = data_args.action_horizon
    short = [(e, meta.episodes[e]["length"]) for e in episodes if meta.episodes[e]["length"] < horizon]
    if short:
        listed = ", ".join(f"{e} ({n} frames)" for e, n in short[:5])
        raise RecipeError(
            f"action_horizon={horizon} is longer than episodes {listed}{' ...' if len(short) > 5 else ''}; "
            "lower action_horizon or leave those episodes out (train_episodes / eval_episodes)"
        )
    keys = [k for k in (data_args.action_key, data_args.state_key) if k is not None]
    wanted = set(episodes)
    bad: dict[str, set[int]] = {key: set() for key in keys}
    tasks: dict[int, set[int]] = {}  # task_index -> the run's episodes using it
    root, files = data_files(meta, data_args, episode_table(meta, episodes))  # downloaded if not local
    for path in files:
        try:
            table = pq.read_table(root / path, columns=["episode_index", "task_index", *keys])
        except (pa.ArrowException, OSError) as e:
            raise RecipeError(
                f"data file {str(root / path)!r} is corrupt or truncated ({' '.join(str(e).split())}); restore it or "
                "download the dataset again, or leave the episodes in it out (train_episodes / eval_episodes)"
            ) from None
        episode_index = table["episode_index"].to_numpy()
        for e, t in {(int(e), int(t)) for e, t in zip(episode_index, table["task_index"].to_numpy(), strict=True)}:
            if e in wanted:
                tasks.setdefault(t, set()).add(e)
        for key in keys:
            values = column_values(table[key].combine_chunks(), feature_dim(meta, key))
            rows = ~np.isfinite(values).all(axis=1)
            bad[key].update(int(e) for e in np.unique(episode_index[rows]) if int(e) in wanted)
    for key, found in bad.items():
        if found:
            listed = sorted(found)
            raise RecipeError(
                f"{key!r} has NaN or inf values in episodes {listed[:10]}{' ...' if len(listed) > 10 else ''}; "
                "fix the dataset or leave those episodes out (train_episodes / eval_episodes)"
            )
    return check_episode_tasks(meta, tasks)


def check_episode_tasks(meta, tasks: dict[int, set[int]]) -> list[str]:
    """Refuse an empty task: a VLA is conditioned on the instruction, and a LeRobot dataset gives every episode
    one, so an empty string is a broken conversion that would train the policy to act without one."""
    names = {int(i): str(task) for task, i in meta.tasks["task_index"].items()} if meta.tasks is not None else {}
    for index, episodes in sorted(tasks.items()):
        if not names.get(index, "").strip():
            listed = sorted(episodes)
            raise RecipeError(
                f"task_index {index} of meta/tasks.parquet is {'missing' if index not in names else 'empty'}, and "
                f"episodes {listed[:10]}{' ...' if len(listed) > 10 else ''} use it: write their instruction into "
                "meta/tasks.parquet, or leave them out (train_episodes / eval_episodes)"
            )
    return [names[index] for index in sorted(tasks)]


def check_videos(meta, data_args: DataArguments, camera_keys: list[str], episodes: list[int]) -> None:
    """Fail before training when a video file the run reads is missing and cannot be downloaded, cannot be opened or
    ends before an episode's last frame (a truncated download, a corrupt file): one seek and a few frames per file,
    naming the file and the episode."""
    import av

    last_needed: dict[tuple[str, Path], tuple[float, int]] = {}  # (camera, file) -> (latest frame time, episode)
    for key in (k for k in camera_keys if k in meta.video_keys):
        for e in episodes:
            path = meta.root / meta.get_video_file_path(e, key)
            end = float(meta.episodes[e][f"videos/{key}/to_timestamp"]) - 1 / meta.fps
            if end > last_needed.get((key, path), (-1.0, -1))[0]:
                last_needed[(key, path)] = (end, e)
    files = sorted({str(path.relative_to(meta.root)) for _, path in last_needed})
    root = fetch_missing(meta, data_args, files, "video file")  # a Hub copy: fetched now
    for (key, path), (end, e) in last_needed.items():
        path = root / path.relative_to(meta.root)
        problem = None
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                container.seek(int(max(end - 1.0, 0.0) / stream.time_base), stream=stream)
                frame_times = (frame.time for frame in container.decode(stream))
                if not any(t is not None and t >= end - 0.5 / meta.fps for t in frame_times):
                    problem = f"it ends before {end:.2f} s"
        except (av.FFmpegError, OSError) as err:
            problem = " ".join(str(err).split())
        if problem:
            raise RecipeError(
                f"video {str(path)!r} ({key}, episode {e}) is corrupt or truncated: {problem}; download or "
                "encode it again, or leave the episodes in it out (train_episodes / eval_episodes)"
            )


def check_episodes(meta, name: str, episodes: list[int]) -> None:
    total = meta.total_episodes
    bad = [e for e in episodes if not 0 <= e < total]
    if bad:
        raise RecipeError(f"{name}: episodes {bad[:5]} do not exist; the dataset has episodes 0..{total - 1}")


def task_episodes(meta, tasks: list[str]) -> set[int]:
    """The episodes whose task matches one of ``tasks``: an exact task string, or ``re:<regex>`` matched against the
    whole task. An entry that matches no task fails, listing the dataset's tasks (the first 20 and the count)."""
    names = [str(task) for task in meta.tasks.index] if meta.tasks is not None else []
    chosen: set[str] = set()
    for entry in tasks:
        if entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as e:
                raise RecipeError(f"tasks: {entry!r} is not a valid regular expression ({e})") from None
            found = {name for name in names if pattern.fullmatch(name)}
        else:
            found = {entry} & set(names)
        if not found:
            shown = ", ".join(map(repr, names[:20])) + (" ..." if len(names) > 20 else "")
            raise RecipeError(
                f"tasks: {entry!r} matches no task of the dataset; it has {len(names)} tasks: {shown} (give exact "
                "task strings, or 're:<regex>' for a pattern)"
            )
        chosen |= found
    table = meta.episodes.select_columns(["episode_index", "tasks"]).with_format(None)[:]
    return {int(e) for e, ts in zip(table["episode_index"], table["tasks"], strict=True) if chosen & set(ts)}


def episode_split(meta, data_args: DataArguments) -> tuple[list[int], list[int] | None]:
    """Train and eval episode indices; train defaults to every episode not held out for eval. ``tasks`` keeps the
    episodes of those tasks among both."""
    total = meta.total_episodes
    eval_eps = parse_episodes(data_args.eval_episodes)
    train_eps = parse_episodes(data_args.train_episodes)
    if train_eps is None:
        train_eps = [e for e in range(total) if e not in set(eval_eps or [])]
    check_episodes(meta, "train_episodes", train_eps)
    check_episodes(meta, "eval_episodes", eval_eps or [])
    if data_args.tasks is not None:
        matching = task_episodes(meta, data_args.tasks)
        train_eps = [e for e in train_eps if e in matching]
        eval_eps = [e for e in eval_eps if e in matching] if eval_eps is not None else None
        if not train_eps:
            raise RecipeError(
                f"tasks: {data_args.tasks} has no episode among train_episodes; widen train_episodes or the tasks"
            )
        if eval_eps == []:
            logger.warning("tasks: %s has no episode among eval_episodes; the run evaluates nothing", data_args.tasks)
            eval_eps = None
    if not train_eps:
        raise RecipeError("train_episodes selects no episode")
    if shared := sorted(set(train_eps) & set(eval_eps or [])):
        # A warning, not an error: evaluating on training episodes is a legitimate overfitting check.
        logger.warning(
            "train_episodes and eval_episodes share episodes %s%s: the eval metrics include training data and do "
            "not measure generalisation; make the two disjoint for a held-out evaluation",
            shared[:10],
            " ..." if len(shared) > 10 else "",
        )
    return train_eps, eval_eps


def dataset_norm_stats(
    meta,
    data_args: DataArguments,
    norm_mode: str,
    action_mask: list[bool] | None,
    episodes: list[int] | None = None,
    relative_mask: list[bool] | None = None,
) -> dict:
    """The run's statistics in the ``config.norm_stats`` layout (see ``normalize``), complete for ``norm_mode``:
    given by ``norm_stats_path``, stored in the dataset, or computed over the training ``episodes`` (``stats``);
    of the relative actions with ``relative_mask`` (``relative_actions``)."""
    dim = feature_dim(meta, data_args.action_key)
    if action_mask is not None and len(action_mask) != dim:
        raise RecipeError(f"action_norm_mask has {len(action_mask)} entries but the action has {dim} dims")
    entry = norm_stats_entry(meta, data_args, norm_mode, episodes, relative_mask=relative_mask)
    if action_mask is not None:
        entry["action"]["mask"] = list(action_mask)
    return {data_args.dataset_repo_id: entry}


def sample_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    """The seed of one sample's randomness (stream 0: image augmentation; others: free for other uses).

    A pure function of the run's seed, the epoch and the sample index, so a sample is drawn the same
    whatever the process, DataLoader worker or batch split, and after a resume.
    """
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1, np.uint64)[0] >> 1)


def openvla_image_augmentation(height: int, width: int):
    """OpenVLA's training augmentation: a random 90%-area square crop resized back, then colour jitter."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop((height, width), scale=(0.9, 0.9), ratio=(1.0, 1.0), antialias=True),
            v2.ColorJitter(brightness=0.2, contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=0.05),
        ]
    )


class VLADataset(Dataset):
    """A ``LeRobotDataset`` restricted to some episodes, yielding the model-agnostic sample dict.

    Per-sample randomness (the image augmentation) is drawn from ``sample_seed(seed, epoch, index)``,
    not the global RNG: the trainer calls :meth:`set_epoch` before each pass.
    """

    def __init__(
        self,
        meta,
        data_args: DataArguments,
        camera_keys: list[str],
        episodes: list[int],
        augment: bool = False,
        seed: int = 0,
        frame_resize: FrameResize | None = None,
        name: str | None = None,
    ):
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.name = name  # a mixture entry's name: samples carry it as "dataset" (their statistics' key)
        self.camera_keys = camera_keys
        self.state_key = data_args.state_key
        selected = state_selection(meta, data_args)  # the dims the model sees (None: all)
        self.state_indices = torch.tensor(selected) if selected is not None else None
        self.action_key = data_args.action_key
        horizon = data_args.action_horizon
        self.seed, self.epoch = seed, 0
        self.dataset = LeRobotDataset(
            data_args.dataset_repo_id,
            root=data_args.dataset_root,
            revision=data_args.dataset_revision,
            episodes=episodes,
            delta_timestamps={self.action_key: [i / meta.fps for i in range(horizon)]},
            video_backend=data_args.video_backend,
        )
        # Frames decoded once into a uint8 cache (None: LeRobot decodes per sample); see data/frame_cache.py.
        self.frames = open_frame_cache(self.dataset, data_args, camera_keys, frame_resize)
        self.augment = None
        if augment:  # at the size the images arrive in: the cached one (OpenVLA's 224, as its RLDS data)
            native = meta.features[camera_keys[0]]["shape"][:2]
            height, width = self.frames.image_shape(camera_keys[0]) if self.frames else native
            self.augment = openvla_image_augmentation(height, width)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, idx: int) -> dict:
        item = self.frames.item(idx) if self.frames is not None else self.dataset[idx]
        actions = item[self.action_key]
        images = [item[key] for key in self.camera_keys]
        state = item[self.state_key] if self.state_key else None
        if self.state_indices is not None:
            state = state[self.state_indices]
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):  # the global RNG stream is left as it was
                torch.manual_seed(sample_seed(self.seed, self.epoch, idx, stream=0))
                images = [self.augment(image) for image in images]
        sample = {
            "images": images,
            "state": state,
            "actions": actions,
            "action_is_pad": item.get(f"{self.action_key}_is_pad", torch.zeros(len(actions), dtype=torch.bool)),
            "task": item.get("task", ""),
            "seed": sample_seed(self.seed, self.epoch, idx, stream=1),  # the sample's flow-matching noise and time
        }
        return sample | {"dataset": self.name} if self.name is not None else sample
