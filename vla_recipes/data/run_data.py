"""The run's data: each dataset (the only one, or every mixture entry) checked, with its statistics, and the
training / evaluation samples built from them. Everything here runs before the model's weights load.

The checks and statistics read every data file (and probe every video): in a multi-process run the main process
alone does them and sends the results to the other ranks, which only read the (small) metadata themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.utils.data import ConcatDataset

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.lerobot import (
    VLADataset,
    check_episode_data,
    check_videos,
    dataset_norm_stats,
    episode_split,
    load_metadata,
    relative_action_mask,
    resolve_camera_keys,
)
from vla_recipes.data.mixture import WeightedMixture, entry_args
from vla_recipes.data.state_selection import feature_dim, state_selection
from vla_recipes.main_process import on_main_process


@dataclass
class EntryData:
    """One dataset of the run (the only one, or a mixture entry), checked, with its statistics."""

    args: DataArguments
    weight: float
    meta: object
    camera_keys: list[str]
    state_indices: list[int] | None
    train_episodes: list[int]
    eval_episodes: list[int] | None
    tasks: list[str]
    action_dim: int
    state_dim: int | None
    relative_mask: list[bool] | None
    norm_stats: dict


def prepare_data(data_args: DataArguments, family, norm_mode: str, weight: float = 1.0) -> EntryData:
    """Every check of one dataset (features, episodes, data, videos, relative actions) and its statistics."""
    meta = load_metadata(data_args)
    camera_keys = resolve_camera_keys(meta, data_args)
    state_indices = state_selection(meta, data_args)  # the state dims the model sees (None: every dim)
    train_episodes, eval_episodes = episode_split(meta, data_args)
    tasks = check_episode_data(meta, data_args, train_episodes + (eval_episodes or []))  # chunk length, NaN/inf
    check_videos(meta, data_args, camera_keys, train_episodes + (eval_episodes or []))  # missing or corrupt files
    action_dim = feature_dim(meta, data_args.action_key)
    state_dim = feature_dim(meta, data_args.state_key) if data_args.state_key else None
    state_dim = len(state_indices) if state_indices is not None else state_dim  # the dims the model sees
    relative_mask = relative_action_mask(data_args, action_dim, state_dim)  # None: absolute actions
    mask = data_args.action_norm_mask or (
        family.default_action_norm_mask(action_dim) if norm_mode == "bounds_q99" else None
    )
    stats = dataset_norm_stats(meta, data_args, norm_mode, mask, train_episodes, relative_mask)
    return EntryData(
        data_args, weight, meta, camera_keys, state_indices, train_episodes, eval_episodes, tasks, action_dim,
        state_dim, relative_mask, next(iter(stats.values())),
    )  # fmt: skip


def prepare_entries(data_args: DataArguments, family, norm_mode: str) -> dict[str, EntryData]:
    """:func:`prepare_data` of the dataset, or of every mixture entry (whose errors then start with its name), run
    once by the main process; every rank gets the same entries (and the same error)."""
    main: dict[str, EntryData] = {}

    def check() -> dict[str, EntryData]:  # sent without the metadata, which can be large (per-episode stats)
        main.update(_checked_entries(data_args, family, norm_mode))
        return {name: replace(e, meta=None) for name, e in main.items()}

    checked = on_main_process(check)
    return main or {name: replace(e, meta=load_metadata(e.args)) for name, e in checked.items()}


def _checked_entries(data_args: DataArguments, family, norm_mode: str) -> dict[str, EntryData]:
    entries = {}
    for name, (weight, args) in entry_args(data_args).items():
        try:
            entries[name] = prepare_data(args, family, norm_mode, weight)
        except RecipeError as e:
            if data_args.datasets is None:
                raise
            raise RecipeError(f"datasets: {name!r}: {e}") from None
    return entries


def check_mixture_dims(entries: dict[str, EntryData]) -> None:
    """The model has one action and one state layout: every mixture entry must have the first entry's dims."""
    (first_name, first), *others = entries.items()
    for name, e in others:
        for what, key, fix in (
            ("action", "action_key", "choose datasets of one action space"),
            ("state", "state_key", "select the same number of dims with each entry's state_indices"),
        ):
            if getattr(e, f"{what}_dim") != getattr(first, f"{what}_dim"):
                raise RecipeError(
                    f"datasets: {name!r} has a {getattr(e, f'{what}_dim')}-dim {what} ({getattr(e.args, key)!r}) "
                    f"but {first_name!r} a {getattr(first, f'{what}_dim')}-dim one: the model has one {what} "
                    f"layout; {fix}"
                )


def training_data(entries: dict[str, EntryData], data_args, seed: int, frame_resize, mixture: bool):
    """The training samples: the dataset's, or the mixture's drawn by weight."""
    datasets = {
        name: VLADataset(
            e.meta, e.args, e.camera_keys, e.train_episodes, augment=data_args.image_augmentation, seed=seed,
            frame_resize=frame_resize, name=name if mixture else None,
        )
        for name, e in entries.items()
    }  # fmt: skip
    if not mixture:
        return next(iter(datasets.values()))
    return WeightedMixture(datasets, {name: e.weight for name, e in entries.items()}, seed=seed)


def eval_data(entries: dict[str, EntryData], frame_resize, mixture: bool):
    """The held-out samples of every dataset that has eval episodes (None: no evaluation)."""
    datasets = [
        VLADataset(
            e.meta, e.args, e.camera_keys, e.eval_episodes, frame_resize=frame_resize, name=name if mixture else None
        )
        for name, e in entries.items()
        if e.eval_episodes
    ]
    return (datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)) if datasets else None
