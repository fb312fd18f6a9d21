"""A decoded frame cache: every training frame decoded once, stored as uint8 and read back memory-mapped.

LeRobot decodes video per sample: each random index seeks into an mp4 and decodes from the last keyframe,
which wastes most of what the machine can decode (issue 8: ~9x on a real 480x640 AV1 dataset). Here each
video file is decoded once, front to back, into one ``.npy`` per camera whose rows are the
``LeRobotDataset`` rows; a sample is then a memmap read plus index arithmetic for the action chunk.

Frames are stored after the first step of the model's image processor (``FrameResize``), so the cache is
small (150 KB a frame at 224x224) and what the model sees is what the per-sample path gives it: OpenVLA's
``pixel_values`` are bit-identical, pi0.5's are within 0.5/255 (one uint8 rounding of its bilinear fit).

An entry is keyed by the dataset's files (``cache_keys``), the rows, the camera and the resize, so any
change builds a new entry. In a multi-process run the main process builds it first while the other ranks wait
(``main_process_first``); a file lock also keeps two runs (or the ranks of another node, whose cache folder is its
own) from building one entry twice. Then all of them map it read-only (the page cache is shared by DataLoader
workers and DDP ranks).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vla_recipes.configs import RecipeError
from vla_recipes.data.cache_keys import cache_root, entry_stem, file_identity, info_sha256, sha256
from vla_recipes.main_process import main_process_first

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FREE_DISK_MARGIN = 2 * 2**30  # bytes left free after the cache is written
RESEEK_GAP_S = 2.0  # between two wanted frames of a file, a longer gap is skipped by seeking, a shorter one decoded
PENDING_FRAMES = 32  # decoded frames waiting for conversion: bounds the build's memory


class NoRoomForCache(RuntimeError):
    """The cache would not fit on its disk with ``FREE_DISK_MARGIN`` to spare: decode per sample instead."""


@dataclass(frozen=True)
class FrameResize:
    """The first step of a model's image processor, applied once when the cache is built.

    ``square_bicubic``: OpenVLA's 8-bit PIL bicubic resize to ``size`` x ``size``; the processor's resize
    of an image already that size is a copy, so its output is bit-identical to the per-sample path.
    ``fit_bilinear``: pi0/pi0.5's aspect-preserving bilinear fit into ``size`` x ``size``, stored unpadded;
    the processor's own fit of it is the identity, so its output differs by one uint8 rounding at most.
    Frames no larger than the model input are stored as they are (their processing is unchanged).
    """

    mode: Literal["square_bicubic", "fit_bilinear"]
    size: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of a cached frame of this native size."""
        size = self.size
        if height <= size and width <= size:
            return height, width
        if self.mode == "square_bicubic":
            return size, size
        new = _fit(height, width, size)
        # Only cache the fitted frame if the processor's own fit of it is the identity (float rounding).
        return new if _fit(*new, size) == new else (height, width)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """One HWC uint8 frame -> HWC uint8 at ``output_size``."""
        height, width = self.output_size(*frame.shape[:2])
        if (height, width) == frame.shape[:2]:
            return frame
        if self.mode == "square_bicubic":
            return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
        # Same arithmetic as Pi05ImageProcessor (uint8 / 255, bilinear, clamp), then back to uint8.
        pixels = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
        resized = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
        return resized[0].mul(255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _fit(height: int, width: int, size: int) -> tuple[int, int]:
    """pi0.5's fit of (height, width) into size x size (``resize_with_pad``'s arithmetic)."""
    ratio = max(width / size, height / size)
    return int(height / ratio), int(width / ratio)


def frame_cache_dir(configured: str | None) -> Path:
    """``frame_cache_dir`` if set, else ``$VLA_RECIPES_CACHE/frames``, else ``~/.cache/vla_recipes/frames``."""
    return Path(configured).expanduser() if configured else cache_root() / "frames"


def _row_columns(dataset, names: list[str]) -> dict[str, np.ndarray]:
    """Whole parquet columns of the dataset's selected rows as numpy arrays (arrow, no per-row Python)."""
    return dict(dataset.hf_dataset.with_format("numpy").select_columns(names)[:])


@dataclass
class _Query:
    """One wanted frame of a video file: its time in the file, the cache row it fills, its episode."""

    time: float
    row: int
    episode: int


def build_camera_cache(dataset, camera: str, resize: FrameResize | None, cache_dir: str | Path) -> Path:
    """The cache entry of one camera of a ``LeRobotDataset``: built if absent, else reused. Returns its path.

    Rows are the dataset's rows (its selected episodes, in order). A frame is LeRobot's: the one nearest to
    ``from_timestamp + timestamp`` in the episode's video file, strictly within ``dataset.tolerance_s``.
    """
    from filelock import FileLock

    meta, root = dataset.meta, Path(dataset.root)
    rows = _row_columns(dataset, ["episode_index", "timestamp"])
    episodes = rows["episode_index"].astype(np.int64)
    starts = {int(e): float(meta.episodes[int(e)][f"videos/{camera}/from_timestamp"]) for e in np.unique(episodes)}
    files = {e: str(meta.get_video_file_path(e, camera)) for e in starts}
    height, width = meta.features[camera]["shape"][:2]
    out_h, out_w = resize.output_size(height, width) if resize else (height, width)
    key = {
        "format": FORMAT_VERSION,
        "repo_id": dataset.repo_id,
        "revision": dataset.revision,
        "info_sha256": info_sha256(root),
        "videos": {path: file_identity(root / path) for path in sorted(set(files.values()))},
        "rows_sha256": sha256(
            episodes.tobytes()
            + rows["timestamp"].astype(np.float32).tobytes()
            + np.array(sorted(starts.items()), dtype=np.float64).tobytes()
        ),
        "tolerance_s": dataset.tolerance_s,
        "camera": camera,
        "resize": [resize.mode, resize.size] if resize else None,
        "shape": [len(episodes), 3, out_h, out_w],
    }
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = entry_stem(key)
    path = cache_dir / f"{stem}.npy"
    with FileLock(str(cache_dir / f"{stem}.lock")):
        if path.is_file():
            if (problem := _entry_problem(path, key["shape"])) is None:
                logger.info("frame cache: reusing %s for %s", path, camera)
                return path
            logger.warning("frame cache: %s (%s) is corrupt: %s; rebuilding it", path, camera, problem)
            path.unlink()
        size = int(np.prod(key["shape"]))
        free = shutil.disk_usage(cache_dir).free
        if free < size + FREE_DISK_MARGIN:
            raise NoRoomForCache(
                f"the frame cache of {camera} needs {size / 2**30:.2f} GiB plus {FREE_DISK_MARGIN / 2**30:.0f} GiB "
                f"to spare in {cache_dir}, which has {free / 2**30:.2f} GiB free; set frame_cache_dir to a larger "
                "disk or frame_cache: false"
            )
        queries: dict[str, list[_Query]] = {}
        for row, (episode, timestamp) in enumerate(zip(episodes.tolist(), rows["timestamp"].tolist(), strict=True)):
            queries.setdefault(files[episode], []).append(_Query(starts[episode] + timestamp, row, episode))
        tmp = cache_dir / f"{stem}.{os.getpid()}.tmp.npy"
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(key["shape"]))
            _decode_into(out, root, queries, resize, (height, width), dataset.tolerance_s, camera)
            out.flush()
            del out
            (cache_dir / f"{stem}.json").write_text(json.dumps(key, indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("frame cache: wrote %s for %s (%.2f GiB)", path, camera, size / 2**30)
    return path


def _entry_problem(path: Path, shape: list[int]) -> str | None:
    """What is wrong with a cache entry on disk (None: it maps with the expected shape and dtype). Entries are
    written whole and renamed into place, so this catches what happens to them afterwards: a truncated copy, a
    full disk, a stray edit. Its content is not hashed (that would read gigabytes per run)."""
    try:
        frames = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    if frames.dtype != np.uint8 or list(frames.shape) != list(shape):
        return f"it holds {frames.dtype} {list(frames.shape)}, expected uint8 {list(shape)}"
    return None


def _decode_into(
    out: np.ndarray,
    root: Path,
    queries: dict[str, list[_Query]],
    resize: FrameResize | None,
    native: tuple[int, int],
    tolerance_s: float,
    camera: str,
) -> None:
    """Decode every file front to back (threaded); convert, resize and write in a pool beside the decoder."""
    from tqdm.auto import tqdm

    def write(frame, row: int) -> None:
        rgb = frame.to_ndarray(format="rgb24")  # LeRobot's conversion
        if rgb.shape[:2] != native:
            raise RecipeError(f"{camera}: a frame is {rgb.shape[:2]}, the dataset's info.json says {native}")
        out[row] = (resize(rgb) if resize else rgb).transpose(2, 0, 1)

    total = sum(len(q) for q in queries.values())
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        tqdm(total=total, desc=f"caching {camera}", unit="frame") as bar,
    ):
        pending: deque = deque()

        def drain(keep: int) -> None:
            while len(pending) > keep or (pending and pending[0].done()):
                pending.popleft().result()
                bar.update()

        def submit(frame, query: _Query) -> None:
            pending.append(pool.submit(write, frame, query.row))
            drain(PENDING_FRAMES)

        for file, wanted in sorted(queries.items()):
            _decode_file(root / file, sorted(wanted, key=lambda q: q.time), tolerance_s, submit)
            drain(0)  # every frame of a file is converted before its container closes


def _decode_file(path: Path, wanted: list[_Query], tolerance_s: float, submit: Callable) -> None:
    """Hand ``submit`` the frame nearest to each wanted time (sorted), decoding the file once in order."""
    import av

    segments, start = [], 0
    for i in range(1, len(wanted) + 1):
        if i == len(wanted) or wanted[i].time - wanted[i - 1].time > RESEEK_GAP_S:
            segments.append(wanted[start:i])
            start = i
    episode = wanted[0].episode
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for segment in segments:
                episode = segment[0].episode
                # LeRobot's seek: the keyframe at or before the first wanted time.
                container.seek(round(segment[0].time / stream.time_base) - 1, backward=True, stream=stream)
                j, previous = 0, None
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    current = (float(frame.pts * stream.time_base), frame)
                    while j < len(segment) and segment[j].time <= current[0]:
                        episode = segment[j].episode
                        _match(segment[j], previous, current, tolerance_s, path, submit)
                        j += 1
                    if j == len(segment):
                        break
                    previous = current
                for query in segment[j:]:  # past the last frame: only the last one can match
                    episode = query.episode
                    _match(query, previous, None, tolerance_s, path, submit)
    except av.error.FFmpegError as e:
        raise RecipeError(f"cannot decode {path} (episode {episode}) for the frame cache: {e}") from e


def _match(query: _Query, previous, current, tolerance_s: float, path: Path, submit: Callable) -> None:
    """The nearer of the frames around ``query.time`` (the earlier on a tie, like LeRobot), if within tolerance."""
    candidates = [c for c in (previous, current) if c is not None]
    best = min(candidates, key=lambda c: abs(c[0] - query.time), default=None)
    if best is None or not abs(best[0] - query.time) < tolerance_s:
        found = "no frame" if best is None else f"the nearest frame is at {best[0]:.4f}s"
        raise RecipeError(
            f"{path} (episode {query.episode}): no frame at {query.time:.4f}s ({found}, tolerance {tolerance_s}s); "
            "the video is truncated or out of sync with the parquet timestamps"
        )
    submit(best[1], query)


class FrameCache:
    """``LeRobotDataset`` items (selected cameras) from the frame cache and the parquet columns, no video decode.

    ``item(i)`` equals ``dataset[i]`` (without image transforms) for every key ``VLADataset`` reads: the
    columns, LeRobot's delta-timestamp chunks and ``<key>_is_pad`` (by index arithmetic within the episode),
    ``task``, and the images as float CHW in [0, 1] at the cached size. The memmaps are opened lazily in each
    process, so a DataLoader worker maps the file instead of receiving a pickled copy.
    """

    def __init__(self, dataset, camera_keys: list[str], resize: FrameResize | None, cache_dir: str | Path):
        from lerobot.datasets.feature_utils import get_delta_indices

        self.camera_keys = list(camera_keys)
        self.paths = {cam: build_camera_cache(dataset, cam, resize, cache_dir) for cam in self.camera_keys}
        meta = dataset.meta
        names = [
            name
            for name in dataset.hf_dataset.column_names
            if meta.features.get(name, {}).get("dtype") not in ("image", "video", "string")
        ]
        arrays = {k: v for k, v in _row_columns(dataset, names).items() if v.dtype.kind in "biuf"}
        self.columns = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        index = arrays["index"].astype(np.int64)
        self.index, self.episode_index = index, arrays["episode_index"].astype(np.int64)
        self.row_of_index = np.full(int(index.max()) + 1, -1, dtype=np.int64)
        self.row_of_index[index] = np.arange(len(index))
        episodes = meta.episodes.select_columns(["episode_index", "dataset_from_index", "dataset_to_index"])[:]
        self.bounds = {
            int(e): (int(start), int(end))
            for e, start, end in zip(
                episodes["episode_index"], episodes["dataset_from_index"], episodes["dataset_to_index"], strict=True
            )
        }
        deltas = get_delta_indices(dataset.delta_timestamps, meta.fps) if dataset.delta_timestamps else {}
        self.delta_indices = {key: np.asarray(d, dtype=np.int64) for key, d in deltas.items()}
        self.tasks = {int(i): task for task, i in meta.tasks["task_index"].items()}
        self._images: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def image_shape(self, camera: str) -> tuple[int, int]:
        """(height, width) of the cached frames of ``camera``."""
        return tuple(self.images()[camera].shape[2:])

    def images(self) -> dict[str, np.ndarray]:
        """The per-camera memmaps of this process (copy-on-write mode: writable for torch, never written)."""
        if self._images is None:
            self._images = {cam: np.load(path, mmap_mode="c") for cam, path in self.paths.items()}
        return self._images

    def item(self, i: int) -> dict:
        index, (start, end) = int(self.index[i]), self.bounds[int(self.episode_index[i])]
        item = {key: column[i] for key, column in self.columns.items()}
        for key, deltas in self.delta_indices.items():
            wanted = index + deltas
            rows = self.row_of_index[np.clip(wanted, start, end - 1)]
            item[key] = self.columns[key][torch.from_numpy(rows)]
            item[f"{key}_is_pad"] = torch.from_numpy((wanted < start) | (wanted >= end))
        for camera, frames in self.images().items():
            item[camera] = torch.from_numpy(frames[i]).float() / 255  # LeRobot's uint8 -> float
        item["task"] = self.tasks[int(item["task_index"])]
        return item


def open_frame_cache(dataset, data_args, camera_keys: list[str], resize: FrameResize | None) -> FrameCache | None:
    """The frame cache of a ``VLADataset``, or ``None`` for LeRobot's per-sample decoding.

    ``None`` when ``data_args.frame_cache`` is off, when a camera is stored as images (no video to decode), or
    when the cache does not fit on its disk (a warning says so).
    """
    if not data_args.frame_cache or any(dataset.meta.features[k]["dtype"] != "video" for k in camera_keys):
        return None
    with main_process_first():  # every rank builds its datasets at the same point; the others then reuse the entry
        try:
            return FrameCache(dataset, camera_keys, resize, frame_cache_dir(data_args.frame_cache_dir))
        except NoRoomForCache as e:
            logger.warning("%s; decoding video frames per sample instead", e)
            return None
