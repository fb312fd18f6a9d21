"""The family contract: what every registered model family declares, checked over the registry, and a toy third
family defined in this file (no edit to the package) trained through ``recipes/sft.py`` and reloaded.

The toy is what a contributor writes, in ``vla_recipes/models/<family>/`` or in a package of their own: a config, a
few-layer model with a regression head (camera patches + mean-pooled task characters + state -> an action chunk),
an image processor and a processor, a collator, and the :class:`~vla_recipes.families.Family` declaration. The
subprocess finds it through ``$VLA_RECIPES_FAMILIES`` (this module's name, with ``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from cli import DEMOS, ROOT, run
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


def tiny(family: Family) -> PretrainedConfig:
    """The family's tiny config, with what ``Family.configure`` writes from a one-camera, 8-dim-state dataset."""
    config = AutoConfig.for_model(family.model_type, **json.loads(json.dumps(family.tiny_config)))
    config.camera_keys, config.action_dim, config.action_horizon, config.state_dim = [CAMERA], 7, 4, 8
    config.norm_mode = family.default_norm_mode(config)
    return config


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


def toy_recipe(folder: Path, dataset_root: str, **overrides) -> Path:
    """The toy family on the synthetic dataset: 5 training episodes, 60 steps unless overridden."""
    recipe = {
        "model_config": {"model_type": TOY, **ToyFamily.tiny_config},
        "finetune_mode": "full",
        "dataset_repo_id": "local/synthetic_reach",
        "dataset_root": dataset_root,
        "camera_keys": [CAMERA],
        "state_key": "observation.state",
        "action_horizon": 4,
        "train_episodes": ["0:5"],
        "eval_episodes": ["5:6"],
        "output_dir": str(folder / "out"),
        "learning_rate": 3e-3,
        "max_steps": 60,
        "per_device_train_batch_size": 16,
        "logging_steps": 10,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def sft(recipe: Path, *extra: str, until=None):
    """``python recipes/sft.py`` as a user with an out-of-tree family runs it: the module named in the env var."""
    env = {"VLA_RECIPES_FAMILIES": Path(__file__).stem, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return run([sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(recipe), *extra], env=env, until=until)


def test_toy_family_trains_through_sft_saves_and_reloads(tmp_path, dataset_root):
    """A family outside the package, named in $VLA_RECIPES_FAMILIES: ``recipes/sft.py`` trains it (the loss falls),
    the output folder reloads with AutoModel / AutoProcessor, and batched ``predict_action`` equals one by one."""
    out = tmp_path / "out"
    result = sft(toy_recipe(tmp_path, dataset_root))
    assert result.returncode == 0, result.stderr[-3000:]

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    assert torch.isfinite(torch.tensor(json.loads((out / "eval_results.json").read_text())["eval_loss"]))
    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model) is ToyForActionPrediction and type(processor) is ToyProcessor
    assert model.config.state_dim == 8 and model.config.camera_keys == [CAMERA]
    assert "state=state" in (out / "README.md").read_text()  # the card's usage snippet: the family takes a state

    g = torch.Generator().manual_seed(0)
    images = [[torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)] for _ in range(3)]
    tasks = ["pick up the bowl", "go", "reach the red cube on the left"]  # different lengths: padding
    state = torch.randn(3, 8, generator=g)
    batched = model.predict_action(**processor(images=images, text=tasks, state=state))
    one_by_one = torch.cat(
        [
            model.predict_action(**processor(images=images[i : i + 1], text=tasks[i : i + 1], state=state[i : i + 1]))
            for i in range(3)
        ]
    )
    assert batched.shape == (3, 4, 7)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_toy_family_lora_folder_reloads_and_resume_equals_uninterrupted(tmp_path, dataset_root):
    """LoRA: the adapter folder reloads with AutoModel and predicts as its merged model does. Resume: a run killed
    after its first checkpoint and resumed logs the losses and ends with the weights of an uninterrupted one."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from vla_recipes.checkpointing import is_complete

    steps = {"max_steps": 10, "logging_steps": 1, "save_strategy": "steps", "save_steps": 5, "eval_strategy": "no"}
    lora = dict(steps, finetune_mode="lora", merge_adapters=True, eval_episodes=None)
    killed_out = tmp_path / "killed" / "out"
    with ThreadPoolExecutor(3) as pool:
        runs = [
            pool.submit(sft, toy_recipe(tmp_path / "lora", dataset_root, **lora)),
            pool.submit(sft, toy_recipe(tmp_path / "reference", dataset_root, **steps, eval_episodes=None)),
            pool.submit(
                sft,
                toy_recipe(tmp_path / "killed", dataset_root, **steps, eval_episodes=None),
                until=lambda: is_complete(killed_out / "checkpoint-5"),
            ),
        ]
        lora_run, reference, killed = (r.result() for r in runs)
    assert lora_run.returncode == 0, lora_run.stderr[-3000:]
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "lora" / "out"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter, merged = AutoModel.from_pretrained(out).eval(), AutoModel.from_pretrained(out / "merged").eval()
    processor = AutoProcessor.from_pretrained(out)
    g = torch.Generator().manual_seed(0)
    inputs = processor(
        images=[[torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)] for _ in range(2)],
        text=["pick up the bowl", "go"],
        state=torch.randn(2, 8, generator=g),
    )
    torch.testing.assert_close(adapter.predict_action(**inputs), merged.predict_action(**inputs), rtol=1e-5, atol=1e-5)

    if killed.returncode == 0:  # finished before the kill landed (a busy machine): resume from its first checkpoint
        shutil.rmtree(killed_out / "checkpoint-10")
    resumed = sft(tmp_path / "killed" / "recipe.yaml", "--resume_from_checkpoint", str(killed_out / "checkpoint-5"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def logged(folder: Path) -> dict[int, float]:
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    expected, got = logged(tmp_path / "reference" / "out"), logged(killed_out)
    assert sorted(expected) == sorted(got) == list(range(1, 11)), (expected, got)
    assert max(abs(expected[step] - got[step]) for step in expected) <= 1e-6, (expected, got)
    reference_weights = load_file(tmp_path / "reference" / "out" / "model.safetensors")
    weights = load_file(killed_out / "model.safetensors")
    assert reference_weights.keys() == weights.keys()
    assert all(torch.equal(reference_weights[k], weights[k]) for k in weights)
