"""The files of a LeRobot dataset a run reads: on disk, fetched from the Hub, or named in one line.

A file missing from a local copy (deleted, or a partial download) is fetched from the dataset's Hub repo the way
LeRobot fetches it (``snapshot_download`` into ``dataset_root``, else into LeRobot's Hub cache). When that cannot
be done (offline, no network, a local-only dataset), the error names the missing files instead of the network;
a file that is on disk but unreadable (truncated, corrupt) is named with what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from vla_recipes.configs import DataArguments, RecipeError


def hub_unreachable(e: Exception) -> str | None:
    """Why the Hub could not give a file, for the errors that mean "no network / not there" (None: another error)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError | EntryNotFoundError):
        return "the dataset's Hub repo does not have it (or is private: `hf auth login`)"
    if isinstance(e, OSError) or type(e).__module__.startswith("httpx"):  # network down, DNS, refused
        return f"the Hub cannot be reached ({type(e).__name__})"
    return None


def _listed(files: list[str]) -> str:
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def fetch_missing(meta, data_args: DataArguments, files: list[str], kind: str) -> Path:
    """The dataset root holding every one of ``files`` (paths relative to it), downloading those not on disk;
    ``kind`` names them in the error ("data file", "video file")."""
    from huggingface_hub import constants, snapshot_download

    root = Path(meta.root)
    missing = [name for name in files if not (root / name).is_file()]
    if not missing:
        return root
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        where = (  # LeRobot's own layout for each case
            {"local_dir": data_args.dataset_root} if data_args.dataset_root else {"cache_dir": _lerobot_hub_cache()}
        )
        try:
            root = Path(
                snapshot_download(
                    data_args.dataset_repo_id,
                    repo_type="dataset",
                    revision=meta.revision,
                    allow_patterns=missing,
                    **where,
                )
            )
        except Exception as e:
            if (reason := hub_unreachable(e)) is None:
                raise
    still = [name for name in missing if not (root / name).is_file()]
    if still:
        raise RecipeError(
            f"{kind}{'s' if len(still) > 1 else ''} {_listed(still)} of the run's episodes "
            f"{'are' if len(still) > 1 else 'is'} missing from {str(root)!r} and cannot be downloaded "
            f"({reason or 'the Hub has no such file or cannot be reached'}); restore the dataset or download it "
            "again, or leave the episodes in it out (train_episodes / eval_episodes)"
        )
    return root


def _lerobot_hub_cache() -> Path:
    from lerobot.utils.constants import HF_LEROBOT_HUB_CACHE

    return HF_LEROBOT_HUB_CACHE


def damaged_metadata(root: Path, repo_id: str) -> RecipeError | None:
    """For a local copy of a dataset (it has ``meta/info.json``): the first missing or unreadable metadata file,
    as one line (None: the metadata files are all there and readable, or this is no local copy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = root / "meta"
    if not (meta / "info.json").is_file():
        return None
    problem = None
    for name in ("info.json", "stats.json"):
        if (meta / name).is_file():
            try:
                json.loads((meta / name).read_text())
            except (ValueError, OSError) as e:
                problem = f"meta/{name} is not valid JSON (truncated or corrupt: {' '.join(str(e).split())})"
                break
    episodes = sorted((meta / "episodes").glob("**/*.parquet"))
    if problem is None and not (meta / "tasks.parquet").is_file():
        problem = "meta/tasks.parquet is missing"
    elif problem is None and not episodes:
        problem = "meta/episodes/ is missing (or holds no parquet file)"
    for path in [meta / "tasks.parquet", *episodes] if problem is None else []:
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            problem = f"{path.relative_to(root)} is corrupt or truncated ({' '.join(str(e).split())})"
            break
    if problem is None:
        return None
    return RecipeError(
        f"dataset {repo_id!r} in {str(root)!r}: {problem}; restore the file or download the dataset again "
        f"(`hf download {repo_id} --repo-type dataset --local-dir {root}`)"
    )
