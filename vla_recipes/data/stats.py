"""Normalisation statistics a recipe needs but the dataset's ``meta/stats.json`` lacks, computed from its data.

OpenVLA (``bounds_q99``) and pi0.5 (``quantiles``) normalise with the 1st and 99th percentiles. Many LeRobot
datasets carry none (every one converted from v2.1), and the ones LeRobot v3.0 stores are the frame-weighted
mean of *per-episode* quantiles (``aggregate_feature_stats``), which is not a quantile of the frames: on a
100-episode synthetic dataset only 37-51% of the state values fall inside those bounds, 98% inside numpy's. Statistics
of all episodes are also wrong for a run that trains on a subset. So, in those cases, this module computes
mean/std/min/max/q01/q99 of the state and action columns of the parquet files (no video is decoded), over the
training episodes, as ``np.quantile(frames, q, axis=0)`` with numpy's default ``linear`` method in float64 (what
OpenVLA computes; openpi's tests compare its own histogram against the same).

- :class:`ExactStats` holds a feature's frames in one float64 array when they fit ``memory_budget`` bytes.
- :class:`HistogramStats` streams beyond that, with a bound on its error that it reports (see its docstring).

Results are cached: one JSON entry per feature in ``stats_cache_dir``, named by a hash of the dataset revision,
``meta/info.json``, each data file's size and mtime, the episodes and the feature. All entries share one folder
lock, so the first process (another run, or another node's main process) computes and the others wait, then read
the same numbers; within a run only the main process asks (``run_data.prepare_entries``) and sends them to the rest.
The dataset folder is written only with ``write_stats_to_dataset`` (through LeRobot's own ``write_stats``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.cache_keys import cache_root, entry_stem, file_identity, info_sha256, sha256
from vla_recipes.data.dataset_files import fetch_missing
from vla_recipes.data.normalize import REQUIRED_STATS
from vla_recipes.data.state_selection import feature_dim, state_selection

logger = logging.getLogger("vla_recipes.stats")

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
QUANTILES = {"q01": 0.01, "q99": 0.99}
MEMORY_BUDGET = 2 * 2**30  # bytes of float64 frames per feature for exact quantiles
HISTOGRAM_BINS = 4096  # the streamed quantiles are within (max - min) / 4096**2 of the exact ones
CACHE_FORMAT = 1  # bump when the computation changes, so old entries are not reused
_LOCK_NAME = ".lock"

Batches = Callable[[], Iterator[np.ndarray]]  # a fresh pass over a feature's (frames, dim) batches


def default_cache_dir() -> Path:
    """``$VLA_RECIPES_CACHE/stats``, else ``~/.cache/vla_recipes/stats`` (the frame cache's sibling)."""
    return cache_root() / "stats"


def _ranks(n: int, q: float) -> tuple[int, int, float]:
    """The two order statistics (0-based) and the weight numpy's ``linear`` quantile interpolates between."""
    h = (n - 1) * q
    k = int(np.floor(h))
    return k, min(k + 1, n - 1), h - k


class ExactStats:
    """All of a feature's frames in one preallocated float64 array; ``np.quantile`` partitions it in place."""

    passes, method = 1, "exact"

    def __init__(self, num_frames: int, dim: int):
        self.values = np.empty((num_frames, dim), dtype=np.float64)
        self.filled = 0

    def update(self, batch: np.ndarray) -> None:
        end = self.filled + len(batch)
        if end > len(self.values):
            raise RecipeError(
                f"the data files hold more frames for the selected episodes than meta/episodes says "
                f"({len(self.values)}); the dataset is inconsistent, re-download or re-convert it"
            )
        self.values[self.filled : end] = batch
        self.filled = end

    def end_pass(self) -> None:
        pass

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The statistics, and their error bound (0: exact)."""
        x = self.values[: self.filled]
        stats = {"mean": x.mean(axis=0), "std": x.std(axis=0), "min": x.min(axis=0), "max": x.max(axis=0)}
        quantiles = np.quantile(x, list(QUANTILES.values()), axis=0, overwrite_input=True)
        stats |= dict(zip(QUANTILES, quantiles, strict=True))
        return stats, {name: np.zeros(x.shape[1]) for name in QUANTILES}


class HistogramStats:
    """q01/q99 in three streamed passes with O(dim x bins) memory, and a per-value bound on their error.

    1. count, min, max, and mean/variance merged per batch (Chan et al.) in float64;
    2. per dim, ``bins`` equal bins over [min, max]: their counts locate the bin holding each order statistic that
       numpy's ``linear`` quantile interpolates between (ranks floor(h) and floor(h)+1, h = (n - 1) q);
    3. inside each such bin, ``bins`` finer bins that also keep the smallest and largest value falling in them. An
       order statistic is read between those two by its rank, so it is off by at most their spread, and is exact
       when it is the first or last value of its fine bin or the bin holds one distinct value (a gripper's two
       values, a constant dim).

    ``error_bound`` (per quantile and dim) is that spread, interpolated as numpy does; it is at most
    ``(max - min) / bins**2`` (4096 bins: 6e-8 of the range, below float32 resolution of most features).
    """

    passes = 3

    def __init__(self, dim: int, bins: int = HISTOGRAM_BINS):
        self.dim, self.bins, self.pass_index = dim, bins, 0
        self.method = f"histogram ({bins} bins)"
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)
        self.lo, self.hi = np.full(dim, np.inf), np.full(dim, -np.inf)
        self.counts = np.zeros((dim, bins), dtype=np.int64)
        self.fine: dict[tuple[int, int], list[np.ndarray]] = {}  # (dim, coarse bin) -> [counts, mins, maxs]
        self.targets: dict[tuple[int, int], tuple[int, int]] = {}  # (dim, rank) -> (coarse bin, rank inside it)

    def _index(self, x: np.ndarray, lo: np.ndarray | float, span: np.ndarray | float) -> np.ndarray:
        """Bin of each value among ``bins`` equal bins of [lo, lo + span] (all 0 for a zero span)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            scale = np.where(span > 0, self.bins / span, 0.0)
            scale = np.where(np.isfinite(scale), scale, 0.0)
            return np.clip(np.floor((x - lo) * scale), 0, self.bins - 1).astype(np.int64)

    def update(self, batch: np.ndarray) -> None:
        x = np.asarray(batch, dtype=np.float64)
        if not len(x):
            return
        if self.pass_index == 0:
            n, mean = len(x), x.mean(axis=0)
            delta, total = mean - self.mean, self.n + n
            self.m2 += ((x - mean) ** 2).sum(axis=0) + delta**2 * self.n * n / total
            self.mean += delta * n / total
            self.n = total
            self.lo, self.hi = np.minimum(self.lo, x.min(axis=0)), np.maximum(self.hi, x.max(axis=0))
            return
        coarse = self._index(x, self.lo, self.hi - self.lo)
        if self.pass_index == 1:
            flat = coarse + np.arange(self.dim) * self.bins
            self.counts += np.bincount(flat.ravel(), minlength=self.dim * self.bins).reshape(self.dim, self.bins)
            return
        width = (self.hi - self.lo) / self.bins
        for (d, c), (counts, mins, maxs) in self.fine.items():
            values = x[coarse[:, d] == c, d]
            fine = self._index(values, self.lo[d] + c * width[d], width[d])
            counts += np.bincount(fine, minlength=self.bins)
            np.minimum.at(mins, fine, values)
            np.maximum.at(maxs, fine, values)

    def end_pass(self) -> None:
        if self.pass_index == 1:  # locate the coarse bin of every order statistic the quantiles need
            cumulative = np.cumsum(self.counts, axis=1)
            for q in QUANTILES.values():
                for d in range(self.dim):
                    for rank in _ranks(self.n, q)[:2]:
                        c = int(np.searchsorted(cumulative[d], rank, side="right"))
                        self.targets[d, rank] = (c, rank - int(cumulative[d, c - 1] if c else 0))
                        self.fine.setdefault(
                            (d, c),
                            [np.zeros(self.bins, np.int64), np.full(self.bins, np.inf), np.full(self.bins, -np.inf)],
                        )
        self.pass_index += 1

    def _order_statistic(self, d: int, rank: int) -> tuple[float, float]:
        """The ``rank``-th smallest value of dim ``d`` and a bound on its error."""
        c, inner = self.targets[d, rank]
        counts, mins, maxs = self.fine[d, c]
        cumulative = np.cumsum(counts)
        f = int(np.searchsorted(cumulative, inner, side="right"))
        j, m = inner - int(cumulative[f - 1] if f else 0), int(counts[f])
        a, b = float(mins[f]), float(maxs[f])
        if m == 1 or a == b or j == 0:
            return a, 0.0
        if j == m - 1:
            return b, 0.0
        return a + (b - a) * j / (m - 1), b - a

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The statistics, and a bound on the error of each quantile."""
        stats = {"mean": self.mean, "std": np.sqrt(self.m2 / self.n), "min": self.lo, "max": self.hi}
        bounds = {}
        for name, q in QUANTILES.items():
            k, k1, t = _ranks(self.n, q)
            values, errors = np.zeros(self.dim), np.zeros(self.dim)
            for d in range(self.dim):
                (a, ea), (b, eb) = self._order_statistic(d, k), self._order_statistic(d, k1)
                values[d], errors[d] = a + (b - a) * t, (1 - t) * ea + t * eb
            stats[name], bounds[name] = values, errors
        return stats, bounds


def make_accumulator(num_frames: int, dim: int, memory_budget: int, bins: int) -> ExactStats | HistogramStats:
    """Exact when the feature's frames fit ``memory_budget`` bytes as float64, else streamed."""
    return ExactStats(num_frames, dim) if num_frames * dim * 8 <= memory_budget else HistogramStats(dim, bins)


def compute_stats(
    batches: Batches, accumulator: ExactStats | HistogramStats, progress: Callable[[int], None] | None = None
) -> tuple[dict[str, list[float]], dict]:
    """Run ``accumulator``'s passes over ``batches``; returns the statistics and how they were computed
    (``method``, and ``error_bound``: the largest bound on the error of each quantile, 0 when exact)."""
    for _ in range(accumulator.passes):
        for batch in batches():
            accumulator.update(batch)
            if progress is not None:
                progress(len(batch))
        accumulator.end_pass()
    stats, bounds = accumulator.result()
    how = {"method": accumulator.method, "error_bound": {name: float(b.max(initial=0.0)) for name, b in bounds.items()}}
    return {name: np.asarray(stats[name], dtype=np.float64).tolist() for name in STAT_NAMES}, how


# --- the dataset side: which statistics, over which episodes, from which files ------------------------------------


def episode_table(meta, episodes: list[int]) -> dict[str, np.ndarray]:
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    table = meta.episodes.select_columns(columns).with_format("numpy")[:]
    keep = np.isin(table["episode_index"], episodes)
    return {name: np.asarray(table[name])[keep] for name in columns}


def data_files(meta, data_args: DataArguments, table: dict) -> tuple[Path, list[str]]:
    """The dataset root and the data files of the episodes in ``table`` (``episode_table``), downloaded (without
    videos) when not on disk."""
    pairs = sorted({(int(c), int(f)) for c, f in zip(table["data/chunk_index"], table["data/file_index"], strict=True)})
    files = [meta.data_path.format(chunk_index=c, file_index=f) for c, f in pairs]
    return fetch_missing(meta, data_args, files, "data file"), files


def _read_feature(paths: list[Path], key: str, dim: int, episodes: np.ndarray) -> Batches:
    """Passes over ``key``'s values in the rows of ``episodes``, one parquet record batch at a time."""
    import pyarrow.parquet as pq

    def batches() -> Iterator[np.ndarray]:
        for path in paths:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=[key, "episode_index"]):
                keep = np.isin(batch.column("episode_index").to_numpy(), episodes)
                yield column_values(batch.column(key), dim)[keep]

    return batches


def _read_relative_actions(
    paths: list[Path],
    data_args: DataArguments,
    dims: tuple[int, int],
    selected: list[int] | None,
    mask: list[bool],
    episodes: np.ndarray,
) -> Batches:
    """Passes over the relative actions the model trains on, one episode at a time: for each frame t and chunk step
    k with t + k inside the episode (padded steps are out of the loss, so out of the statistics), action[t + k] minus
    state[t] on the dims of ``mask`` (``relative_actions``). An episode lies in one data file, rows in frame order."""
    import pyarrow.parquet as pq

    from vla_recipes.data.normalize import to_relative

    action_key, state_key, horizon = data_args.action_key, data_args.state_key, data_args.action_horizon

    def batches() -> Iterator[np.ndarray]:
        for path in paths:
            table = pq.read_table(path, columns=["episode_index", action_key, state_key])
            index = table["episode_index"].to_numpy()
            actions = column_values(table[action_key].combine_chunks(), dims[0]).astype(np.float64)
            states = column_values(table[state_key].combine_chunks(), dims[1]).astype(np.float64)
            if selected is not None:
                states = states[:, selected]
            for e in np.intersect1d(np.unique(index), episodes):
                rows = np.flatnonzero(index == e)
                a, s = actions[rows], states[rows]
                n = len(rows)
                chunks = [to_relative(a[k:, None], s[: n - k], mask)[:, 0] for k in range(min(horizon, n))]
                yield np.concatenate(chunks)

    return batches


def column_values(column, dim: int) -> np.ndarray:
    """A parquet column of (possibly nested) lists as a ``(rows, dim)`` array."""
    import pyarrow as pa

    values = column
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):  # (n, *shape)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(len(column), dim)


def _write_to_dataset(root: Path, computed: dict[str, dict]) -> None:
    """Merge ``computed`` into ``meta/stats.json`` with LeRobot's io helpers (other features kept as they are)."""
    from lerobot.datasets.io_utils import load_stats, write_stats

    stored = load_stats(root) or {}
    for key, stats in computed.items():
        stored.setdefault(key, {}).update({name: np.asarray(stats[name]) for name in STAT_NAMES})
    write_stats(stored, root)


def load_stats_file(path: str | Path, dataset_key: str | None, features: dict[str, str]) -> dict[str, dict]:
    """Statistics given by the recipe: a LeRobot ``meta/stats.json``, an OpenVLA ``dataset_statistics.json``
    (``{dataset: {"action": ..., "proprio": ...}}``, pick one with ``dataset_key``) or a model's ``config.json``
    (its ``norm_stats``). ``features`` maps ``action``/``proprio`` to the dataset's feature keys; returns those
    of them the file holds, in the ``config.norm_stats`` layout."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"norm_stats_path={str(path)!r} is not a file; give a LeRobot meta/stats.json, an OpenVLA "
            "dataset_statistics.json or a model's config.json"
        )
    data = json.loads(path.read_text())
    if "norm_stats" in data:  # a model's config.json
        data = data["norm_stats"] or {}
    entries = {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("action"), dict)}
    if entries:  # OpenVLA layout: one entry per dataset
        if dataset_key is None and len(entries) > 1:
            raise RecipeError(
                f"norm_stats_path {str(path)!r} holds statistics of several datasets; set norm_stats_key to one "
                f"of {sorted(entries)}"
            )
        if dataset_key is not None and dataset_key not in entries:
            raise RecipeError(f"norm_stats_key={dataset_key!r} is not in {str(path)!r}; it has {sorted(entries)}")
        data = entries[dataset_key or next(iter(entries))]
    out = {}
    for name, key in features.items():
        stats = data.get(key) if isinstance(data.get(key), dict) else data.get(name)
        if isinstance(stats, dict):
            out[name] = {
                s: np.asarray(stats[s], dtype=np.float64).reshape(-1).tolist() for s in STAT_NAMES if s in stats
            }
    if not out:
        raise RecipeError(
            f"norm_stats_path {str(path)!r} holds no statistics for {' or '.join(map(repr, features.values()))} "
            f"(it has {sorted(data)})"
        )
    return out


def _reason(stored: dict, norm_mode: str, subset: str | None) -> str | None:
    """Why the stored statistics of a feature cannot be used as they are (None: they can)."""
    required = REQUIRED_STATS[norm_mode]
    if not required:
        return None
    reasons = []
    if missing := [s for s in required if s not in stored]:
        reasons.append(f"meta/stats.json lacks {', '.join(missing)}")
    elif "q01" in required:
        reasons.append("LeRobot's stored q01/q99 are a mean of per-episode quantiles, not quantiles of the frames")
    if subset:
        reasons.append(f"the run trains on {subset} episodes")
    return ", and ".join(reasons) or None


def norm_stats_entry(
    meta,
    data_args: DataArguments,
    norm_mode: str,
    episodes: list[int] | None = None,
    *,
    relative_mask: list[bool] | None = None,
    memory_budget: int = MEMORY_BUDGET,
    bins: int = HISTOGRAM_BINS,
) -> dict:
    """The ``config.norm_stats`` entry of the run: ``{"action", "proprio"?, "num_transitions", "num_trajectories"}``.

    Per feature: the recipe's ``norm_stats_path`` if it holds it; else the dataset's stored statistics if
    ``norm_mode`` can use them; else computed over ``episodes`` (default: all) and cached. With ``relative_mask``
    (``relative_actions``) the action statistics are those of the relative action chunks, never the stored ones.
    """
    from tqdm.auto import tqdm

    episodes = sorted(set(range(meta.total_episodes) if episodes is None else episodes))
    features = {"action": data_args.action_key}
    if data_args.state_key is not None:
        features["proprio"] = data_args.state_key
    subset = f"{len(episodes)} of {meta.total_episodes}" if len(episodes) < meta.total_episodes else None
    if data_args.write_stats_to_dataset and subset:
        raise RecipeError(
            f"write_stats_to_dataset: the run trains on {subset} episodes, and statistics of a subset must not "
            "replace the dataset's meta/stats.json (it describes every episode); drop write_stats_to_dataset"
        )
    if data_args.write_stats_to_dataset and relative_mask is not None:
        raise RecipeError(
            "write_stats_to_dataset: with relative_actions the action statistics are those of the relative actions, "
            "which must not replace the dataset's (absolute) meta/stats.json; drop write_stats_to_dataset"
        )
    given = (
        load_stats_file(data_args.norm_stats_path, data_args.norm_stats_key, features)
        if data_args.norm_stats_path
        else {}
    )
    entry, reasons = {}, {}
    for name, key in features.items():
        stored = (meta.stats or {}).get(key, {})
        stored = {s: np.asarray(stored[s], dtype=np.float64).reshape(-1).tolist() for s in STAT_NAMES if s in stored}
        if name in given:
            entry[name] = given[name]
        elif name == "action" and relative_mask is not None and REQUIRED_STATS[norm_mode]:
            reasons[key] = "the actions are relative to the state (relative_actions)"
        elif (reason := _reason(stored, norm_mode, subset)) is not None:
            reasons[key] = reason
        else:
            entry[name] = stored
    _check_given(meta, given, features, norm_mode, data_args.norm_stats_path)
    table = episode_table(meta, episodes)
    num_frames = int(table["length"].sum())
    if reasons:
        if not episodes or not num_frames:
            raise RecipeError(
                f"norm_mode={norm_mode!r} needs statistics of {', '.join(map(repr, reasons))} that cannot be "
                "computed: the run selects no frames (train_episodes); select episodes or give norm_stats_path"
            )
        computed = _cached_stats(meta, data_args, episodes, table, reasons, relative_mask, memory_budget, bins, tqdm)
        entry |= {name: computed[key] for name, key in features.items() if key in computed}
    if (selected := state_selection(meta, data_args)) is not None:  # the dims the model sees (full-dim cache)
        entry["proprio"] = {name: [values[i] for i in selected] for name, values in entry["proprio"].items()}
    return {**entry, "num_transitions": num_frames, "num_trajectories": len(episodes)}


def _check_given(meta, given: dict, features: dict[str, str], norm_mode: str, path: str | None) -> None:
    for name, stats in given.items():
        key = features[name]
        missing = [s for s in REQUIRED_STATS[norm_mode] if s not in stats]
        if missing:
            raise RecipeError(
                f"norm_mode={norm_mode!r} needs {', '.join(missing)} for {key!r}, which norm_stats_path {path!r} "
                "lacks; give a file that has them, or drop norm_stats_path to compute them from the dataset"
            )
        dim, dims = feature_dim(meta, key), {len(v) for v in stats.values()}
        if dims != {dim}:
            raise RecipeError(
                f"norm_stats_path {path!r} holds {'/'.join(map(str, sorted(dims)))}-dim statistics for {key!r}, "
                f"but the dataset's {key!r} has {dim} dims"
            )


def _cached_stats(
    meta, data_args, episodes, table, reasons: dict[str, str], relative_mask, memory_budget, bins, tqdm
) -> dict:
    """The statistics of each feature in ``reasons``: read from the cache, or computed and cached (under its lock).
    Relative actions are cached under their own key (the mask, chunk length and state dims they depend on)."""
    from filelock import FileLock

    root, files = data_files(meta, data_args, table)
    cache_dir = Path(data_args.stats_cache_dir).expanduser() if data_args.stats_cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    base = {
        "format": CACHE_FORMAT,
        "repo_id": data_args.dataset_repo_id,
        "revision": meta.revision,
        "info_sha256": info_sha256(root),
        "files": {name: file_identity(root / name) for name in files},
        "episodes": sha256(json.dumps(episodes)),
        "exact_budget": memory_budget,
        "bins": bins,
    }
    num_frames, out, computed, reused, how = int(table["length"].sum()), {}, [], [], {}
    start = time.perf_counter()
    with FileLock(cache_dir / _LOCK_NAME):
        for key in reasons:
            relative = relative_mask is not None and key == data_args.action_key
            entry_key = {**base, "feature": key}
            if relative:
                selected = state_selection(meta, data_args)
                entry_key["relative"] = {
                    "mask": relative_mask,
                    "state_key": data_args.state_key,
                    "state_indices": selected,
                    "horizon": data_args.action_horizon,
                }
            path = cache_dir / f"{entry_stem(entry_key)}.json"
            dim = feature_dim(meta, key)
            if path.is_file():
                if (cached := _read_entry(path, dim)) is not None:
                    out[key] = cached
                    reused.append(key)
                    continue
                logger.warning("norm stats: the cache entry %s of %r is corrupt; computing it again", path, key)
            paths = [root / f for f in files]
            if relative:
                dims = (dim, feature_dim(meta, data_args.state_key))
                reader = _read_relative_actions(paths, data_args, dims, selected, relative_mask, np.asarray(episodes))
                lengths = table["length"].astype(np.int64)
                horizon = data_args.action_horizon
                rows = int(sum(int(np.clip(lengths - k, 0, None).sum()) for k in range(horizon)))
            else:
                reader, rows = _read_feature(paths, key, dim, np.asarray(episodes)), num_frames
            accumulator = make_accumulator(rows, dim, memory_budget, bins)
            with tqdm(total=rows * accumulator.passes, unit="frame", desc=f"norm stats of {key}") as bar:
                stats, how[key] = compute_stats(reader, accumulator, bar.update)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": entry_key, "how": how[key], "stats": stats}))
            os.replace(tmp, path)
            out[key] = stats
            computed.append(key)
        if data_args.write_stats_to_dataset:
            _write_to_dataset(root, out)
    over = f"{len(episodes)} of {meta.total_episodes} episodes ({num_frames} frames"
    by_reason: dict[str, list[str]] = {}
    for key, reason in reasons.items():
        by_reason.setdefault(reason, []).append(repr(key))
    why = "; ".join(f"{', '.join(keys)}: {r}" if len(by_reason) > 1 else r for r, keys in by_reason.items())
    if computed:
        streamed = [key for key in computed if how[key]["method"] != "exact"]
        methods = "; ".join(
            f"{key!r} {how[key]['method']}, q01/q99 within {max(how[key]['error_bound'].values()):.2g}"
            for key in streamed
        )
        logger.info(
            "norm stats: computed %s of %s over %s, %s) in %.2f s, because %s; cached in %s",
            "/".join(STAT_NAMES),
            ", ".join(map(repr, computed)),
            over,
            methods or "exact quantiles",
            time.perf_counter() - start,
            why,
            cache_dir,
        )
    if reused:
        logger.info(
            "norm stats: reused the cached %s of %s over %s) from %s (needed because %s)",
            "/".join(STAT_NAMES),
            ", ".join(map(repr, reused)),
            over,
            cache_dir,
            why,
        )
    if data_args.write_stats_to_dataset:
        logger.info("norm stats: wrote the statistics of %s into %s", ", ".join(out), root / "meta" / "stats.json")
    return out


def _read_entry(path: Path, dim: int) -> dict[str, list[float]] | None:
    """A cache entry's statistics, or None when the file is not a complete entry of ``dim``-dim statistics (a
    truncated or edited file: it is then computed again and replaced, not reused on every run)."""
    try:
        stats = json.loads(path.read_text())["stats"]
        values = np.asarray([stats[name] for name in STAT_NAMES], dtype=np.float64)
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return stats if values.shape == (len(STAT_NAMES), dim) and np.isfinite(values).all() else None


def action_stats_markdown(norm_stats: dict | None) -> str:
    """The action statistics of each dataset in ``norm_stats`` as Markdown tables, for the model card."""
    parts = []
    for dataset, entry in (norm_stats or {}).items():
        stats = entry.get("action") or {}
        if not stats:
            continue
        header = ["stat", *(f"dim {i}" for i in range(len(next(iter(stats.values())))))]
        rows = [header, ["---"] * len(header)]
        rows += [[name, *(str(v) if name == "mask" else f"{v:.6g}" for v in values)] for name, values in stats.items()]
        parts.append(
            f"Action statistics ({dataset}, {entry.get('num_trajectories', '?')} episodes, "
            f"{entry.get('num_transitions', '?')} frames):\n\n" + "".join(f"| {' | '.join(row)} |\n" for row in rows)
        )
    return "\n".join(parts)
