"""The family contract: every behaviour families share, one test each, parametrised over the registry (the package's
families and a toy third family defined in this file, with no edit to the package). A new family gets every check
without a test edit; what only one family does (OpenVLA's weight layout, pi0.5's parity with LeRobot) stays in its
own file.

The toy is what a contributor writes, in ``vla_recipes/models/<family>/`` or in a package of their own: a config, a
few-layer model with a regression head (camera patches + mean-pooled task characters + state -> an action chunk),
an image processor and a processor, a collator, and the :class:`~vla_recipes.families.Family` declaration. The
subprocess finds it through ``$VLA_RECIPES_FAMILIES`` (this module's name, with ``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from cli import DEMOS, ROOT, accelerate_launch, run
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    BatchFeature,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import ModelOutput

from vla_recipes.data.collators import VLADataCollator
from vla_recipes.data.normalize import Normalizer
from vla_recipes.families import (
    Family,
    FamilyDeclarationError,
    families,
    get_family,
    package_families,
    register_family,
)
from vla_recipes.models.adapters import AdapterFolderMixin
from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer

TOY = "toy_regressor"
CAMERA = "observation.images.image"
WRIST = "observation.images.wrist_image"


class ToyConfig(PretrainedConfig):
    model_type = TOY

    def __init__(self, image_size: int = 32, hidden_size: int = 32, vocab_size: int = 128, **kwargs: Any) -> None:
        self.image_size, self.hidden_size, self.vocab_size = image_size, hidden_size, vocab_size
        # What Family.configure writes from the data (saved with the weights).
        for name, default in (("action_dim", 7), ("action_horizon", 4), ("state_dim", None), ("camera_keys", [])):
            setattr(self, name, kwargs.pop(name, default))
        self.norm_mode, self.norm_stats = kwargs.pop("norm_mode", "mean_std"), kwargs.pop("norm_stats", None)
        self.default_unnorm_key = kwargs.pop("default_unnorm_key", None)
        super().__init__(**kwargs)


@dataclass
class ToyOutput(ModelOutput):
    loss: torch.Tensor | None = None
    actions: torch.Tensor | None = None


class ToyBlock(nn.Module):
    """A residual MLP block: the unit FSDP wraps."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(width), nn.Sequential(nn.Linear(width, 2 * width), nn.GELU())
        self.out = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.mlp(self.norm(x)))


class ToyForActionPrediction(AdapterFolderMixin, PreTrainedModel):
    """Patchified cameras (averaged), mean-pooled characters of the task and the state -> two blocks -> a linear
    regression head for the normalised action chunk; the loss is the MSE over the real (unpadded) chunk steps."""

    config_class = ToyConfig
    base_model_prefix = "toy"
    _no_split_modules = ["ToyBlock"]

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        width = config.hidden_size
        self.patches = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.embed = nn.Embedding(config.vocab_size, width)
        self.state_proj = nn.Linear(config.state_dim, width) if config.state_dim else None
        self.blocks = nn.ModuleList([ToyBlock(width), ToyBlock(width)])
        self.head = nn.Linear(width, config.action_horizon * config.action_dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.05)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def lora_target_modules(self) -> list[str]:
        """The LoRA targets when the recipe names none: the blocks' linears (the head is small, trained by LoRA's
        neighbours through them)."""
        return [
            name
            for name, module in self.named_modules()
            if name.startswith("blocks.") and isinstance(module, nn.Linear)
        ]

    def predict_chunk(self, pixel_values, input_ids, attention_mask, state=None) -> torch.Tensor:
        batch, cameras = pixel_values.shape[:2]
        image = self.patches(pixel_values.flatten(0, 1)).mean((-2, -1)).view(batch, cameras, -1).mean(1)
        mask = attention_mask[..., None].to(image.dtype)
        text = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        x = image + text + (self.state_proj(state) if self.state_proj is not None else 0)
        for block in self.blocks:
            x = block(x)
        return self.head(x).view(batch, self.config.action_horizon, self.config.action_dim)

    def forward(self, pixel_values, input_ids, attention_mask, state=None, actions=None, action_is_pad=None):
        predicted = self.predict_chunk(pixel_values, input_ids, attention_mask, state)
        loss = None
        if actions is not None:
            real = (~action_is_pad.bool())[..., None].expand_as(actions).to(predicted.dtype)
            loss = ((predicted - actions) ** 2 * real).sum() / real.sum().clamp(min=1)
        return ToyOutput(loss=loss, actions=predicted)

    @torch.no_grad()
    def predict_action(self, pixel_values, input_ids, attention_mask, state=None, unnorm_key=None) -> torch.Tensor:
        """The action chunk [B, horizon, action_dim] in the dataset's units (``config.norm_stats``)."""
        normalized = self.predict_chunk(pixel_values, input_ids, attention_mask, state)
        return Normalizer.from_config(self.config).actions_from_model(normalized, None, unnorm_key)


class ToyImageProcessor(BaseImageProcessor):
    """Per sample, one [3, H, W] image per camera (uint8, or float in [0, 1]) -> [B, cameras, 3, size, size]."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        def one(image) -> torch.Tensor:
            image = torch.as_tensor(image)
            image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            size = (self.image_size, self.image_size)
            return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0] * 2 - 1

        pixels = torch.stack([torch.stack([one(image) for image in sample]) for sample in images])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)


class ToyProcessor(ProcessorMixin):
    """The one processor call shape (images per camera, task text, optional state, and for training the raw action
    chunks); it owns normalisation, with the statistics of the model config (:class:`Normalizer`)."""

    def __init__(self, image_processor: ToyImageProcessor | None = None, tokenizer=None) -> None:
        super().__init__(image_processor=image_processor, tokenizer=tokenizer)
        self.normalizer: Normalizer | None = None

    def set_model_config(self, config: ToyConfig) -> None:
        self.normalizer = Normalizer.from_config(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any) -> ToyProcessor:
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor.set_model_config(ToyConfig.from_pretrained(pretrained_model_name_or_path))
        return processor

    def __call__(
        self, images=None, text=None, state=None, actions=None, action_is_pad=None, unnorm_key=None
    ) -> BatchFeature:
        inputs = dict(self.image_processor(images))
        inputs |= dict(self.tokenizer(text, padding=True, return_tensors="pt"))
        inputs.pop("token_type_ids", None)
        if state is not None:
            inputs["state"] = self.normalizer.normalize(torch.as_tensor(state).float(), "proprio", unnorm_key)
        if actions is not None:
            inputs["actions"] = self.normalizer.actions_to_model(torch.as_tensor(actions).float(), state, unnorm_key)
            inputs["action_is_pad"] = torch.as_tensor(action_is_pad)
        return BatchFeature(inputs)


@register_family
class ToyFamily(Family):
    model_type = TOY
    config_class = ToyConfig
    model_class = ToyForActionPrediction
    processor_class = ToyProcessor
    image_processor_class = ToyImageProcessor
    fsdp_blocks = ("ToyBlock",)
    frame_resize = None  # the processor resizes; the cache keeps the native frames
    tiny_config = {"image_size": 32, "hidden_size": 32}
    supported_modes = ("full", "lora")

    def default_norm_mode(self, config):
        return "mean_std"

    def offline_tokenizer(self, config):
        return build_gemma_like_tokenizer()

    def new_processor(self, config, tokenizer_name_or_path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path) if tokenizer_name_or_path else None
        processor = ToyProcessor(ToyImageProcessor(config.image_size), tokenizer or self.offline_tokenizer(config))
        processor.set_model_config(config)
        return processor

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        config.state_dim = fields["state_dim"]
        super().configure(config, data_args, camera_keys, **fields)

    def check_prompts(self, processor, config, tasks) -> None:
        """Mean-pooled characters: a task of any length fits."""

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset):
        from vla_recipes.trainers.base import VLATrainer

        processor.set_model_config(model.config)  # the run's statistics
        return VLATrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=VLADataCollator(processor),
            processing_class=processor,
        )


# What AutoModel / AutoProcessor resolve; a family in the package does this in its folder's __init__.py.
AutoConfig.register(TOY, ToyConfig, exist_ok=True)
AutoModel.register(ToyConfig, ToyForActionPrediction, exist_ok=True)
AutoImageProcessor.register(ToyConfig, image_processor_classes={"torchvision": ToyImageProcessor}, exist_ok=True)
AutoProcessor.register(ToyConfig, ToyProcessor, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# The contract, over every registered family (the package's and the toy).


def norm_stats(action_dim: int, state_dim: int, action_mask: list[bool] | None = None) -> dict:
    """Statistics of every kind a norm mode reads (mean/std, min/max, q01/q99), for actions and state."""
    rng = np.random.default_rng(0)

    def stats(dim: int) -> dict[str, list[float]]:
        q01, q99 = -1 - rng.random(dim), 1 + rng.random(dim)
        return {
            "mean": rng.normal(size=dim).tolist(),
            "std": (0.5 + rng.random(dim)).tolist(),
            "min": (q01 - 1).tolist(),
            "max": (q99 + 1).tolist(),
            "q01": q01.tolist(),
            "q99": q99.tolist(),
        }

    action = stats(action_dim) | ({"mask": action_mask} if action_mask is not None else {})
    return {"reach": {"action": action, "proprio": stats(state_dim)}}


def tiny(family: Family, max_cameras: int = 1) -> PretrainedConfig:
    """The family's tiny config, with what ``Family.configure`` writes from a dataset of up to ``max_cameras``
    cameras (as many as the family sees), an 8-dim state and 7-dim actions in chunks of 4, statistics included
    (the model predicts in dataset units)."""
    from vla_recipes.configs import DataArguments, RecipeError

    data_args = DataArguments(dataset_repo_id="local/synthetic_reach", action_horizon=4)
    config = AutoConfig.for_model(family.model_type, **json.loads(json.dumps(family.tiny_config)))
    norm_mode = family.default_norm_mode(config)
    stats = norm_stats(7, 8, family.default_action_norm_mask(7))
    fields = {"action_dim": 7, "state_dim": 8, "norm_mode": norm_mode, "norm_stats": stats}
    for cameras in range(max_cameras, 0, -1):
        try:
            family.configure(config, data_args, [CAMERA, WRIST][:cameras], **fields)
            return config
        except RecipeError:  # more cameras than the family sees
            if cameras == 1:
                raise
    raise AssertionError(max_cameras)


def tiny_model(family: Family, config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A random model with no all-zero tensor left: zero-initialised gates or heads (pi0.5's adaRMS gates) would
    hide an input from the actions, and then a test comparing actions could not fail on it."""
    torch.manual_seed(seed)
    model = AutoModel.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and not param.any():
                param.normal_(0.0, 0.1)
    return model


def robot_inputs(config: PretrainedConfig, size: int = 3, seed: int = 1) -> dict[str, Any]:
    """What a robot gives, in the one processor call shape: per sample one uint8 [3, H, W] image per camera, task
    strings of different lengths (padding), the raw state."""
    g = torch.Generator().manual_seed(seed)
    images = [
        [torch.randint(0, 256, (3, 48, 64), generator=g, dtype=torch.uint8) for _ in config.camera_keys]
        for _ in range(size)
    ]
    tasks = ["pick up the bowl", "go", "open the top drawer and put the bowl inside"][:size]
    return {"images": images, "text": tasks, "state": torch.randn(size, 8, generator=g)}


def sampling_kwargs(model: PreTrainedModel, size: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """A sampling policy's ``predict_action`` takes its starting noise (``noise`` [B, horizon, max_action_dim or
    action_dim]): fixed here, so that a comparison of two calls compares the model, not two draws."""
    if "noise" not in inspect.signature(model.predict_action).parameters:
        return {}
    config = model.config
    width = getattr(config, "max_action_dim", config.action_dim)
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(size, config.action_horizon, width, generator=g)}


def predict(model, processor, case: dict[str, Any]) -> torch.Tensor:
    """``predict_action`` on a robot case (``noise`` in the case: a sampling policy's starting noise)."""
    sampling = {"noise": case["noise"]} if "noise" in case else {}
    return model.predict_action(**processor(images=case["images"], text=case["text"], state=case["state"]), **sampling)


@pytest.mark.parametrize("name", sorted(families()))
def test_family_declares_what_generic_code_reads(name):
    """Auto classes resolve to the declared ones, the FSDP blocks exist in the model, the processor builds offline,
    the frame-cache resize is the processor's size, every LeRobot type reads into the family's config."""
    from vla_recipes.configs import FinetuneMode
    from vla_recipes.data.frame_cache import FrameResize
    from vla_recipes.data.normalize import NORM_MODES
    from vla_recipes.families import lerobot_policy_types

    family = get_family(name)
    config = tiny(family)
    assert type(config) is family.config_class and config.model_type == name
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    assert type(model) is family.model_class
    assert set(family.fsdp_blocks) <= {type(module).__name__ for module in model.modules()}
    processor = family.new_processor(config, None)
    assert type(processor) is family.processor_class
    assert isinstance(processor.image_processor, family.image_processor_class)
    family.check_prompts(processor, config, ["pick up the bowl"])  # a short task fits
    expected = None if family.frame_resize is None else FrameResize(family.frame_resize, config.image_size)
    assert family.frame_resize_for(config) == expected
    assert config.norm_mode in NORM_MODES and set(family.supported_modes) <= set(typing.get_args(FinetuneMode))
    assert all(lerobot_policy_types()[t] is family.config_class for t in family.lerobot_policy_types)
    if name in package_families():  # the package's families have a CPU demo recipe for their tiny model
        assert DEMOS[name]["model_config"]["model_type"] == name


def frozen(model: PreTrainedModel) -> list[str]:
    return sorted(name for name, param in model.named_parameters() if not param.requires_grad)


@pytest.mark.parametrize("name", sorted(families()))
def test_save_and_auto_reload_predict_identically(name, tmp_path):
    """``save_pretrained``, then AutoConfig / AutoModel / AutoProcessor: the declared classes, the statistics and
    cameras, the frozen parameters, the weights, the processor's outputs and the actions, all to the bit."""
    family = get_family(name)
    model = tiny_model(family, tiny(family, max_cameras=2))
    processor = family.new_processor(model.config, None)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    assert type(AutoConfig.from_pretrained(tmp_path)) is family.config_class
    reloaded, reprocessor = AutoModel.from_pretrained(tmp_path).eval(), AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is family.model_class and type(reprocessor) is family.processor_class
    assert reloaded.config.norm_stats == model.config.norm_stats
    assert reloaded.config.camera_keys == model.config.camera_keys
    assert frozen(reloaded) == frozen(model)
    weights, reweights = model.state_dict(), reloaded.state_dict()
    assert weights.keys() == reweights.keys() and all(torch.equal(weights[k], reweights[k]) for k in weights)
    case = robot_inputs(model.config)
    inputs, reinputs = processor(**case), reprocessor(**case)
    assert inputs.keys() == reinputs.keys() and all(torch.equal(inputs[k], reinputs[k]) for k in inputs)
    sampling = sampling_kwargs(model, 3)
    assert torch.equal(reloaded.predict_action(**reinputs, **sampling), model.predict_action(**inputs, **sampling))


@pytest.mark.parametrize("name", sorted(families()))
def test_batched_predict_action_equals_one_by_one(name):
    """Prompts of three lengths (padding) and two cameras: each row of the batch is the action chunk of that sample
    alone, [B, horizon, action_dim] float32 in the dataset's units."""
    family = get_family(name)
    model = tiny_model(family, tiny(family, max_cameras=2))
    processor = family.new_processor(model.config, None)
    case = robot_inputs(model.config)
    inputs = processor(**case)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3, "prompts of different lengths"
    sampling = sampling_kwargs(model, 3)
    batched = model.predict_action(**inputs, **sampling)
    assert batched.shape == (3, 4, 7) and batched.dtype == torch.float32
    for i in range(3):
        one = model.predict_action(
            **processor(**{key: value[i : i + 1] for key, value in case.items()}),
            **{key: value[i : i + 1] for key, value in sampling.items()},
        )
        torch.testing.assert_close(one, batched[i : i + 1], atol=1e-5, rtol=1e-5)


MODE_CASES = [
    pytest.param(name, mode, id=f"{name}-{mode}")
    for name in sorted(families())
    for mode in ("full", "lora")
    if mode in get_family(name).supported_modes
]


@pytest.mark.parametrize(("name", "mode"), MODE_CASES)
def test_a_training_step_trains_what_the_mode_says(name, mode):
    """One AdamW step on a batch the processor makes for training: full fine-tuning changes every trainable
    parameter (none is dead weight); LoRA wraps exactly the model's ``lora_target_modules()`` and changes only the
    adapters and the modules the family trains in full beside them (``modules_to_save``). Frozen weights stay."""
    from peft.tuners.lora import LoraLayer

    from vla_recipes.configs import ModelArguments
    from vla_recipes.finetuning import apply_finetune_mode

    family = get_family(name)
    model = tiny_model(family, tiny(family)).train()
    processor = family.new_processor(model.config, None)
    g = torch.Generator().manual_seed(4)
    chunk = {
        "actions": torch.randn(2, 4, 7, generator=g),
        "action_is_pad": torch.tensor([[False] * 4, [False] * 3 + [True]]),
    }
    batch = processor(**robot_inputs(model.config, size=2), **chunk)
    targets = model.lora_target_modules()
    if mode == "lora":
        lora_args = ModelArguments(model_config={"model_type": name}, finetune_mode="lora", lora_r=4)
        model = apply_finetune_mode(model, lora_args, modules_to_save=family.modules_to_save(model))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    params = dict(model.named_parameters())
    changed = {n for n, before in trainable.items() if not torch.equal(params[n].detach(), before)}
    assert changed == set(trainable), sorted(set(trainable) - changed)[:10]
    assert all(torch.equal(params[n].detach(), before) for n, before in frozen.items())
    if mode == "lora":
        base = model.get_base_model()
        assert {n for n, m in base.named_modules() if isinstance(m, LoraLayer)} == set(targets)
        assert all("lora_" in n or "modules_to_save" in n for n in trainable), sorted(trainable)[:10]


@pytest.fixture(scope="module")
def wide_root(tmp_path_factory) -> str:
    """2 episodes x 8 frames of textured, non-square (240x320) video: larger than every tiny model's input, so each
    family's frame-cache resize runs (keeping the aspect ratio or not)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path_factory.mktemp("wide") / "wide"
    features = {
        CAMERA: {"dtype": "video", "shape": (240, 320, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (8,), "names": None},
        "action": {"dtype": "float32", "shape": (7,), "names": None},
    }
    dataset = LeRobotDataset.create("local/wide", fps=10, features=features, root=root, use_videos=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    for _ in range(2):
        for t in range(8):
            base = np.stack([xx + t * 8, yy, (xx + yy) // 2], axis=-1) % 256
            frame = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            state, action = rng.normal(size=8).astype(np.float32), rng.normal(size=7).astype(np.float32)
            dataset.add_frame({CAMERA: frame, "observation.state": state, "action": action, "task": "wipe"})
        dataset.save_episode()
    dataset.finalize()
    return str(root)


@pytest.mark.parametrize("name", sorted(families()))
def test_frame_cache_gives_the_processor_the_pixels_of_per_sample_decoding(name, wide_root, tmp_path):
    """Frames cached at the family's ``frame_resize`` (or native) give its processor the pixel_values per-sample
    decoding gives: identical for a resize the processor repeats exactly (square_bicubic, native), within one uint8
    step for pi0.5's fit_bilinear (stored unpadded); states, action chunks and tasks identical."""
    from vla_recipes.configs import DataArguments
    from vla_recipes.data.lerobot import VLADataset, load_metadata, resolve_camera_keys

    family = get_family(name)
    config = tiny(family)
    processor = family.new_processor(config, None)
    resize = family.frame_resize_for(config)

    def dataset(**kw) -> VLADataset:
        args = DataArguments(
            dataset_repo_id="local/wide", dataset_root=wide_root, frame_cache_dir=str(tmp_path), action_horizon=3, **kw
        )
        meta = load_metadata(args)
        return VLADataset(meta, args, resolve_camera_keys(meta, args), [0, 1], frame_resize=resize)

    cached, plain = dataset(), dataset(frame_cache=False)
    assert cached.frames is not None and plain.frames is None
    samples, references = [cached[i] for i in range(len(cached))], [plain[i] for i in range(len(plain))]
    stored = (240, 320) if resize is None else resize.output_size(240, 320)
    assert samples[0]["images"][0].shape == (3, *stored) and references[0]["images"][0].shape == (3, 240, 320)
    assert resize is None or stored != (240, 320)  # the cache resized

    def pixels(batch: list[dict]) -> torch.Tensor:
        inputs = {"images": [s["images"] for s in batch], "text": [s["task"] for s in batch]}
        return processor(**inputs, state=torch.stack([s["state"] for s in batch]))["pixel_values"]

    ours, theirs = pixels(samples), pixels(references)
    if resize is None or resize.mode == "square_bicubic":
        assert torch.equal(ours, theirs)
    else:
        error = (ours - theirs).abs().max().item()
        assert 0 < error <= 1 / 255 + 1e-6  # [-1, 1] range: half a uint8 step of [0, 1], doubled
    for a, b in zip(samples, references, strict=True):
        for key in ("state", "actions", "action_is_pad"):
            assert torch.equal(a[key], b[key])
        assert a["task"] == b["task"] == "wipe"


def save_run(model, processor, model_args, folder: Path) -> None:
    """What sft.py does at the end of a run: ``hub.save_for_inference`` on a Trainer holding the model."""
    from transformers import Trainer

    from vla_recipes.configs import VLATrainingArguments
    from vla_recipes.hub import save_for_inference

    args = VLATrainingArguments(output_dir=str(folder), report_to="none", use_cpu=True)
    save_for_inference(Trainer(model=model, args=args, processing_class=processor), model_args)


def output_folders(name: str, tmp_path: Path) -> dict[Path, torch.Tensor]:
    """The output folders of a run of family ``name`` (full; LoRA with ``merge_adapters``: the adapter folder and
    its ``merged/`` model), each with the robot inputs and the actions it must predict beside it
    (``<folder>.inputs.pt``)."""
    from vla_recipes.configs import ModelArguments
    from vla_recipes.finetuning import apply_finetune_mode

    family = get_family(name)
    model = tiny_model(family, tiny(family))
    processor = family.new_processor(model.config, None)
    case = robot_inputs(model.config, size=2) | sampling_kwargs(model, 2)
    full = tmp_path / f"{name}-full"
    save_run(model, processor, ModelArguments(model_config={"model_type": name}), full)
    expected = {full: predict(model, processor, case)}
    if "lora" not in family.supported_modes:
        return expected

    model.save_pretrained(tmp_path / f"{name}-base")
    base = family.model_class.from_pretrained(tmp_path / f"{name}-base").eval()
    lora_args = ModelArguments(
        model_name_or_path=str(tmp_path / f"{name}-base"), finetune_mode="lora", lora_r=4, merge_adapters=True
    )
    peft_model = apply_finetune_mode(base, lora_args, modules_to_save=family.modules_to_save(base))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make it invisible
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    lora = tmp_path / f"{name}-lora"
    expected[lora] = predict(peft_model.get_base_model(), processor, case)
    save_run(peft_model, processor, lora_args, lora)
    expected[lora / "merged"] = expected[lora]  # merge_adapters: true also writes a standalone merged model
    assert not torch.equal(expected[full], expected[lora])  # the adapter changes the predictions
    for folder, actions in expected.items():
        torch.save({**case, "expected": actions}, f"{folder}.inputs.pt")
    return expected


@pytest.mark.parametrize("name", sorted(families()))
def test_output_folders_reload_with_the_auto_classes(name, tmp_path):
    """The full folder, the LoRA adapter folder (an adapter only: AutoModel loads base + adapter) and its merged
    model predict what the model predicted before saving."""
    for folder, actions in output_folders(name, tmp_path).items():
        if folder.name.endswith("-lora"):
            assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
        model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
        assert type(model) is get_family(name).model_class, folder
        case = torch.load(f"{folder}.inputs.pt", weights_only=True)
        torch.testing.assert_close(predict(model, processor, case), actions, atol=1e-5, rtol=1e-5)


# Runs in a fresh interpreter where `import vla_recipes` fails: loads every folder through the Auto classes with
# trust_remote_code=True and prints, per folder, the class's module and the largest difference to the reference.
LOAD_WITHOUT_PACKAGE = """
import json, sys
sys.modules["vla_recipes"] = None  # as on a machine where the package is not installed
try:
    import vla_recipes
    sys.exit("vla_recipes is importable")
except ImportError:
    pass
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

report = {}
for folder in sys.argv[1:]:
    case = torch.load(f"{folder}.inputs.pt", weights_only=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=case["images"], text=case["text"], state=case["state"])
    actions = model.predict_action(**inputs, **({"noise": case["noise"]} if "noise" in case else {}))
    report[folder] = {
        "modules": sorted({type(o).__module__ for o in (config, model, processor, processor.image_processor)}),
        "max_abs_diff": (actions - case["expected"]).abs().max().item(),
    }
print(json.dumps(report))
"""


def test_output_folders_load_with_trust_remote_code_without_the_package(tmp_path):
    """Every family of the package, full, LoRA and merged folders: ``trust_remote_code=True`` loads them in an
    interpreter that cannot import vla_recipes (one interpreter for all: it costs ~30 s to start on a busy CPU)."""
    folders = [folder for name in sorted(package_families()) for folder in output_folders(name, tmp_path)]
    config = json.loads((tmp_path / "openvla-full" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_openvla.OpenVLAForActionPrediction"
    result = run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, *map(str, folders)],
        timeout=300,
        cwd=tmp_path,  # the checkout is not on the path either
        env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for folder in folders:
        entry = report[str(folder)]
        assert all(module.startswith("transformers_modules.") for module in entry["modules"]), entry
        # the same code and weights: only the float reduction order may differ
        assert entry["max_abs_diff"] <= 1e-5, (str(folder.relative_to(tmp_path)), entry)


def test_an_incomplete_family_fails_at_registration_in_one_line():
    """Before any run: the message names the family and what it lacks; the registry is unchanged."""
    before = families()
    declared = {k: v for k, v in vars(ToyFamily).items() if not k.startswith("__")}

    no_blocks = type("NoBlocks", (Family,), {k: v for k, v in declared.items() if k != "fsdp_blocks"})
    with pytest.raises(FamilyDeclarationError, match=r"^family 'toy_regressor' declares no fsdp_blocks$"):
        register_family(no_blocks)
    no_trainer = type("NoTrainer", (Family,), {k: v for k, v in declared.items() if k != "make_trainer"})
    with pytest.raises(FamilyDeclarationError, match=r"^family 'toy_regressor' declares no make_trainer$"):
        register_family(no_trainer)
    other = type("Other", (Family,), declared | {"model_type": "other_toy"})
    with pytest.raises(FamilyDeclarationError, match="config_class ToyConfig has model_type 'toy_regressor'"):
        register_family(other)
    bare = type("Bare", (PreTrainedModel,), {"config_class": ToyConfig})
    no_lora_targets = type("NoLoraTargets", (Family,), declared | {"model_class": bare})
    with pytest.raises(FamilyDeclarationError, match=r"supports lora but Bare has no lora_target_modules\(\)"):
        register_family(no_lora_targets)
    bare.lora_target_modules = ToyForActionPrediction.lora_target_modules
    with pytest.raises(FamilyDeclarationError, match="supports lora but Bare does not inherit .*AdapterFolderMixin"):
        register_family(no_lora_targets)
    taken = type("Taken", (Family,), declared)
    with pytest.raises(FamilyDeclarationError, match="already registered by test_family_contract.ToyFamily"):
        register_family(taken)
    assert families() == before


# The toy's demo recipe (a package family's is recipes/demo/<model_type>.yaml).
TOY_DEMO = {
    "model_config": {"model_type": TOY, **ToyFamily.tiny_config},
    "finetune_mode": "full",
    "dataset_repo_id": "local/synthetic_reach",
    "camera_keys": [CAMERA],
    "state_key": "observation.state",
    "action_horizon": 4,
    "learning_rate": 3e-3,
    "report_to": "none",
    "seed": 0,
}


def demo(name: str) -> dict[str, Any]:
    return DEMOS[name] if name in package_families() else TOY_DEMO


def family_env(name: str) -> dict[str, str]:
    """What a user with an out-of-tree family sets: its module in $VLA_RECIPES_FAMILIES, importable."""
    if name in package_families():
        return {}
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    return {"VLA_RECIPES_FAMILIES": Path(__file__).stem, "PYTHONPATH": path}


def logged(output_dir: Path, key: str) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


# The loss logged over the last 20 of 60 steps is below this fraction of the first 20's, for every family.
LOSS_FALL = 0.75
STANDARD_LOGS = {"loss", "grad_norm", "learning_rate", "epoch", "step"}


def sft_recipe(name: str, folder: Path, dataset_root: str) -> dict[str, Any]:
    """The family's demo recipe shrunk to 3 episodes of the two-camera set and 60 steps (a cosine schedule: the
    demo's own is sized for hundreds of steps)."""
    return {
        **demo(name),
        "dataset_root": dataset_root,
        "train_episodes": ["0:3"],
        "eval_episodes": ["3:4"],
        "output_dir": str(folder / "out"),
        "max_steps": 60,
        "lr_scheduler_type": "cosine",
        "lr_scheduler_kwargs": {},
        "warmup_steps": 6,
        "per_device_train_batch_size": 8,
        "logging_steps": 10,
        "eval_strategy": "steps",
        "eval_steps": 60,
        "save_strategy": "no",
        "image_augmentation": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, two_camera_root) -> dict[str, tuple[dict[str, Any], Any]]:
    """Every family's ``accelerate launch recipes/sft.py`` run (its recipe and result), two at a time: a run is
    mostly an interpreter start, and CI has two cores."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("sft")

    def launch(name: str) -> tuple[dict[str, Any], Any]:
        recipe = sft_recipe(name, root / name, two_camera_root)
        (root / name).mkdir()
        (root / name / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        command = ("recipes/sft.py", "--config", str(root / name / "recipe.yaml"))
        return recipe, accelerate_launch(*command, env=family_env(name))

    names = sorted(families())
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(launch, names), strict=True))


@pytest.mark.parametrize("name", sorted(families()))
def test_trains_through_sft_saves_and_reloads(name, sft_runs):
    """``accelerate launch recipes/sft.py`` on the family's demo recipe (``sft_recipe``): the loss falls, eval
    reports the family's metrics, the card names the data, the output folder reloads with AutoModel / AutoProcessor
    with the run's data settings, and batched ``predict_action`` equals one by one on the trained model."""
    family, (recipe, result) = get_family(name), sft_runs[name]
    out = Path(recipe["output_dir"])
    assert result.returncode == 0, result.stderr[-3000:]

    losses = logged(out, "loss")
    assert len(losses) == 6 and sum(losses[-2:]) < LOSS_FALL * sum(losses[:2]), losses
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    metrics = {key for entry in history if "loss" in entry for key in entry} - STANDARD_LOGS
    if "action_accuracy" in metrics:  # a token-classifying family: far above chance (1/256 per token)
        assert logged(out, "action_accuracy")[-1] > 0.1 > 2 / 256
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert torch.isfinite(torch.tensor(evaluated["eval_loss"]))
    assert {f"eval_{key}" for key in metrics} <= evaluated.keys(), (metrics, evaluated)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: robotics" in card and "local/synthetic_reach" in card

    model, processor = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    assert type(model) is family.model_class and type(processor) is family.processor_class
    config = model.config
    assert config.camera_keys == recipe.get("camera_keys", [CAMERA, WRIST])
    assert config.action_horizon == recipe["action_horizon"] and config.action_dim == 7
    assert config.norm_mode == recipe.get("norm_mode", family.default_norm_mode(config))
    assert config.norm_stats["local/synthetic_reach"]["action"].get("mask") == family.default_action_norm_mask(7)
    assert ("state=state" in card) == family.takes_state(config)  # the card's usage snippet

    case = robot_inputs(config) | sampling_kwargs(model, 3)
    batched = predict(model, processor, case)
    assert batched.shape == (3, recipe["action_horizon"], 7) and torch.isfinite(batched).all()
    one_by_one = torch.cat(
        [predict(model, processor, {key: value[i : i + 1] for key, value in case.items()}) for i in range(3)]
    )
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- slow: kill with SIGKILL mid-save, then resume

# Per family: full fine-tuning on 2 processes, LoRA on 1 process with a dataloader worker.
RESUME_SETUPS = {"full-2proc": ("full", "multi_cpu.yaml", 0), "lora-1proc-1worker": ("lora", "single_gpu.yaml", 1)}
RESUME_CASES = [
    pytest.param(name, setup, id=f"{name}-{setup}")
    for name in sorted(families())
    for setup, (mode, _, _) in RESUME_SETUPS.items()
    if mode in get_family(name).supported_modes
]
KILLS = (6, 9)  # kill the moment checkpoint-6 (or 9) appears, i.e. while it is being written


def resume_recipe(folder: Path, dataset_root: str, name: str, mode: str, processes: int, workers: int) -> Path:
    """The family's demo recipe: 10 steps over 32 frames (2 to 5 epochs), saving every 3 steps, keeping 2,
    augmented images."""
    recipe = {
        **demo(name),
        "finetune_mode": mode,
        "dataset_root": dataset_root,
        "camera_keys": [CAMERA],
        "train_episodes": ["0:2"],
        "eval_episodes": None,
        "eval_strategy": "no",
        "image_augmentation": True,
        "per_device_train_batch_size": 8 // processes,
        "max_steps": 10,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 3,
        "save_total_limit": 2,
        "dataloader_num_workers": workers,
        "output_dir": str(folder / "out"),
        "disable_tqdm": True,
    }
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def logged_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, sorted(p.name for p in out.iterdir())
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def cut_short(folder: Path) -> None:
    """Make ``folder`` what a kill while writing its weights leaves: the weights cut short, no completion mark."""
    from vla_recipes.checkpointing import COMPLETE_MARK

    (folder / COMPLETE_MARK).unlink(missing_ok=True)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "setup"), RESUME_CASES)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, dataset_root, name, setup):
    """A run SIGKILLed while writing a checkpoint and resumed with ``--resume_from_checkpoint true`` skips the
    half-written ones, logs the uninterrupted run's losses and ends with its weights (<= 1e-6)."""
    from concurrent.futures import ThreadPoolExecutor

    from vla_recipes.checkpointing import checkpoints, is_complete, resolve_resume

    mode, config, workers = RESUME_SETUPS[setup]
    processes = 2 if config == "multi_cpu.yaml" else 1

    def launch(folder: str, *extra: str, until=None):
        recipe = resume_recipe(tmp_path / folder, dataset_root, name, mode, processes, workers)
        command = ("recipes/sft.py", "--config", str(recipe), *extra)
        # One thread per process: a tiny model gains nothing from more, and spinning threads slow a busy machine.
        env = {"OMP_NUM_THREADS": "1", **family_env(name)}
        return accelerate_launch(*command, config=config, timeout=300, until=until, env=env)

    out = tmp_path / "resumed" / "out"
    with ThreadPoolExecutor(2) as pool:  # the reference and the run to kill side by side: the CI machine has 2 cores
        reference = pool.submit(launch, "reference")
        # Killed once checkpoint-6 or, if the poll missed it, checkpoint-9 is there, before the final weights are.
        killed = pool.submit(
            launch,
            "resumed",
            until=lambda: (
                not any(out.glob("*.safetensors")) and any((out / f"checkpoint-{step}").exists() for step in KILLS)
            ),
        )
        reference, killed = reference.result(), killed.result()
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    # A tiny model saves in ~25 ms, often faster than the kill lands (later still on a busy machine): then cut the
    # newest checkpoint as a kill while writing it would have left it.
    *older, newest = checkpoints(out)
    killed_mid_save = not is_complete(newest)
    cut_short(newest)
    resumed_from = resolve_resume(True, out)
    assert resumed_from == str(older[-1]), (older, newest)
    shutil.copytree(resumed_from, out / "checkpoint-13")  # left by a longer run: newer than any step here
    cut_short(out / "checkpoint-13")

    resumed = launch("resumed", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # Only complete checkpoints are left, the newest two (save_total_limit), half-written ones gone.
    left = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in left] == ["checkpoint-9", "checkpoint-10"], left
    assert all(is_complete(p) for p in left)

    expected, got = logged_losses(tmp_path / "reference" / "out"), logged_losses(out)
    assert sorted(expected) == sorted(got) == list(range(1, 11)), (expected, got)
    loss_diff = max(abs(expected[s] - got[s]) for s in expected)
    weights_ref, weights = final_weights(tmp_path / "reference" / "out"), final_weights(out)
    assert weights_ref.keys() == weights.keys()
    weight_diff = max((weights_ref[k].float() - weights[k].float()).abs().max().item() for k in weights)
    print(
        f"\n{name}-{setup}: killed while saving {newest.name}: {killed_mid_save}, resumed from "
        f"{Path(resumed_from).name}, max abs diff: losses {loss_diff}, weights {weight_diff}"
    )
    assert loss_diff <= 1e-6, (expected, got)
    assert weight_diff <= 1e-6
