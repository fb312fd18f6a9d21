"""The decoded frame cache: same samples as LeRobot's per-sample decoding, reuse, invalidation, failures (what each
family's processor makes of the cached frames is the family contract's, tests/test_family_contract.py)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data import frame_cache
from vla_recipes.data.frame_cache import FrameCache, FrameResize
from vla_recipes.data.lerobot import VLADataset, load_metadata, resolve_camera_keys
from vla_recipes.families import get_family, package_families

CAMERA = "observation.images.image"
WRIST = "observation.images.wrist_image"


def data_args(root: str, cache_dir: Path, **kw) -> DataArguments:
    return DataArguments(
        dataset_repo_id="local/synthetic_reach", dataset_root=str(root), frame_cache_dir=str(cache_dir), **kw
    )


def vla_dataset(root, cache_dir, episodes, cameras=None, frame_resize=None, augment=False, **kw) -> VLADataset:
    args = data_args(root, cache_dir, camera_keys=cameras, **kw)
    meta = load_metadata(args)
    return VLADataset(meta, args, resolve_camera_keys(meta, args), episodes, augment=augment, frame_resize=frame_resize)


def assert_same_samples(cached: VLADataset, plain: VLADataset, indices) -> None:
    for i in indices:
        a, b = cached[i], plain[i]
        assert len(a["images"]) == len(b["images"])
        for x, y in zip(a["images"], b["images"], strict=True):
            assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y), f"image of sample {i}"
        for key in ("state", "actions", "action_is_pad"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{key} of sample {i}"
        assert a["task"] == b["task"]


@pytest.fixture
def count_decodes(monkeypatch) -> list[Path]:
    """Every video file the cache decodes, in order (a spy on ``_decode_file``)."""
    decoded: list[Path] = []
    real = frame_cache._decode_file

    def spy(path, *args):
        decoded.append(path)
        return real(path, *args)

    monkeypatch.setattr(frame_cache, "_decode_file", spy)
    return decoded


def test_native_size_cache_is_bit_identical(dataset_root, tmp_path):
    """Every sample of a subset of episodes: images, state, action chunks (padded at episode ends), task."""
    cached = vla_dataset(dataset_root, tmp_path, [1, 2, 4], action_horizon=5)
    plain = vla_dataset(dataset_root, tmp_path, [1, 2, 4], action_horizon=5, frame_cache=False)
    assert cached.frames is not None and plain.frames is None
    assert len(cached) == len(plain) == 48
    assert_same_samples(cached, plain, range(len(plain)))
    assert cached[15]["action_is_pad"].tolist() == [False, True, True, True, True]  # last frame of episode 1
    assert not cached[16]["action_is_pad"].any()


def test_frame_resize_sizes():
    """What a cached frame's size is (that the processor then gives the per-sample pixels is the family contract's,
    tests/test_family_contract.py): square_bicubic squares, fit_bilinear keeps the aspect, stored unpadded, and a
    frame no larger than the input stays native; the families' default configs resize to 224."""
    assert FrameResize("square_bicubic", 32).output_size(48, 64) == (32, 32)
    assert FrameResize("fit_bilinear", 32).output_size(48, 64) == (24, 32)
    for mode in ("square_bicubic", "fit_bilinear"):
        assert FrameResize(mode, 64).output_size(48, 64) == (48, 64)  # not larger than the input: native
    for name in package_families():
        family = get_family(name)
        assert family.frame_resize_for(family.config_class()) == FrameResize(family.frame_resize, 224)


def test_multi_camera(two_camera_root, tmp_path):
    cameras = [CAMERA, WRIST]
    cached = vla_dataset(two_camera_root, tmp_path, [0, 3], cameras=cameras, action_horizon=4)
    plain = vla_dataset(two_camera_root, tmp_path, [0, 3], cameras=cameras, action_horizon=4, frame_cache=False)
    assert set(cached.frames.paths) == set(cameras)
    assert_same_samples(cached, plain, range(len(plain)))
    assert not torch.equal(*cached[0]["images"])


def test_reuse_and_invalidation(two_camera_root, tmp_path, count_decodes):
    """A second open decodes nothing; a new resolution, camera or video file builds a new entry."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(two_camera_root, root)
    video = root / "videos" / CAMERA / "chunk-000" / "file-000.mp4"
    vla_dataset(root, cache, [0, 1])
    assert count_decodes == [video]
    first = vla_dataset(root, cache, [0, 1])
    assert count_decodes == [video] and first.frames is not None  # reused
    vla_dataset(root, cache, [0, 1], frame_resize=FrameResize("square_bicubic", 32))
    vla_dataset(root, cache, [0, 1], cameras=[WRIST])
    assert count_decodes == [video, video, root / "videos" / WRIST / "chunk-000" / "file-000.mp4"]
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))  # the video was rewritten
    vla_dataset(root, cache, [0, 1])
    assert len(count_decodes) == 4 and len(list(cache.glob("*.npy"))) == 4
    assert not list(cache.glob("*.tmp*")), "a temporary file was left behind"


def test_disk_full_falls_back_to_per_sample_decoding(dataset_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(frame_cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 10**6))
    with caplog.at_level(logging.WARNING, logger="vla_recipes.data.frame_cache"):
        dataset = vla_dataset(dataset_root, tmp_path, [0], action_horizon=2)
    assert dataset.frames is None and "decoding video frames per sample instead" in caplog.text
    assert "frame_cache_dir" in caplog.text  # the fix is named
    assert dataset[3]["images"][0].shape == (3, 64, 64)
    assert not list(tmp_path.glob("*.npy"))


def test_dataloader_with_two_workers_yields_the_same_samples(dataset_root, tmp_path):
    dataset = vla_dataset(dataset_root, tmp_path, [0, 5], action_horizon=3)
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=list)
    loaded = [sample for batch in loader for sample in batch]
    assert len(loaded) == len(dataset)
    for i, sample in enumerate(loaded):
        expected = dataset[i]
        assert torch.equal(sample["images"][0], expected["images"][0]) and torch.equal(
            sample["actions"], expected["actions"]
        )


def test_augmentation_is_per_sample_at_the_cached_size(dataset_root, tmp_path):
    resize = FrameResize("square_bicubic", 32)
    dataset = vla_dataset(dataset_root, tmp_path, [0, 1], frame_resize=resize, augment=True)
    plain = vla_dataset(dataset_root, tmp_path, [0, 1], frame_resize=resize)
    image = dataset[5]["images"][0]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image, dataset[5]["images"][0])  # drawn from (seed, epoch, index): repeatable
    assert not torch.equal(image, plain[5]["images"][0])  # and applied
    dataset.set_epoch(1)
    assert not torch.equal(image, dataset[5]["images"][0])


def test_truncated_video_names_the_file(dataset_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    video = root / "videos" / CAMERA / "chunk-000" / "file-000.mp4"
    with open(video, "r+b") as f:
        f.truncate(video.stat().st_size // 2)
    with pytest.raises(RecipeError, match=rf"{video}.*episode \d"):
        vla_dataset(root, tmp_path / "cache", list(range(6)))
    assert not list((tmp_path / "cache").glob("*.npy"))


def test_concurrent_builders_decode_once(dataset_root, tmp_path, count_decodes):
    """Ranks building the same entry at once: one decodes under the lock, the others wait and map its file."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets = [LeRobotDataset("local/synthetic_reach", root=dataset_root, episodes=[2, 3]) for _ in range(3)]
    caches, errors = [None] * 3, []

    def build(i: int) -> None:
        try:
            caches[i] = FrameCache(datasets[i], [CAMERA], None, tmp_path)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(count_decodes) == 1
    assert len({c.paths[CAMERA] for c in caches}) == 1
    assert all(torch.equal(c.item(7)[CAMERA], caches[0].item(7)[CAMERA]) for c in caches)


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path))
    assert frame_cache.frame_cache_dir(None) == tmp_path / "frames"
    assert frame_cache.frame_cache_dir("~/elsewhere") == Path.home() / "elsewhere"
    monkeypatch.delenv("VLA_RECIPES_CACHE")
    assert frame_cache.frame_cache_dir(None) == Path.home() / ".cache" / "vla_recipes" / "frames"
