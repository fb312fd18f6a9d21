"""The real recipes name what their Hub dataset has and use the settings they claim (that every shipped recipe parses
is tests/test_configs.py's ``test_every_shipped_recipe_parses``).

The real datasets cannot be downloaded here, so their features are written down below with where they were read;
the checks are the ones ``recipes/sft.py`` runs before loading anything (``resolve_camera_keys``, ``configure``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from cli import ROOT

from vla_recipes.configs import RecipeError, parse_recipe
from vla_recipes.data.lerobot import relative_action_mask, resolve_camera_keys
from vla_recipes.data.state_selection import state_selection
from vla_recipes.families import get_family
from vla_recipes.models.openvla import OpenVLAConfig
from vla_recipes.models.openvla_oft import OpenVLAOFTConfig
from vla_recipes.models.pi05 import Pi05Config

FAMILY_FOLDERS = ("openvla", "openvla_oft", "pi05", "pi0")
REAL = [p for p in sorted((ROOT / "recipes").rglob("*.yaml")) if p.parent.parent.name in FAMILY_FOLDERS]
LIBERO_FEATURES: dict[str, tuple[int, ...] | str] = {
    "observation.images.image": "video",
    "observation.images.wrist_image": "video",
    "observation.state": (8,),
    "action": (7,),
}

# Dataset features as published (name -> shape; cameras marked "video"), with the source of each.
DATASETS: dict[str, dict[str, tuple[int, ...] | str]] = {
    # LeRobot's LIBERO datasets (openvla/modified_libero_rlds converted), as lerobot's libero env maps them.
    **{f"lerobot/libero_{suite}_image": LIBERO_FEATURES for suite in ("spatial", "object", "goal", "10")},
    # HuggingFaceVLA/libero (the dataset lerobot/pi05_libero was fine-tuned on): agent view + wrist as image/image2.
    "HuggingFaceVLA/libero": {
        "observation.images.image": "video",
        "observation.images.image2": "video",
        "observation.state": (8,),
        "action": (7,),
    },
    # meta/info.json of lerobot/behavior1k-task0001 (v3.0) / behavior-1k/2025-challenge-demos (state 256 since
    # commit 48908ec of its README); action: R1Pro base 3 + torso 4 + 2 x (arm 7 + gripper 1).
    "lerobot/behavior1k-task0001": {
        "observation.images.rgb.head": "video",
        "observation.images.rgb.left_wrist": "video",
        "observation.images.rgb.right_wrist": "video",
        "observation.state": (256,),
        "action": (23,),
    },
    # lerobot docs/source/robomme.mdx, "Dataset features": raw key names.
    "lerobot/robomme": {"image": "video", "wrist_image": "video", "state": (8,), "actions": (8,)},
    # The dataset card of Traly/calvin_abc_d-lerobot (CALVIN ABC-D, v3.0): state = EE pos 3, Euler 3, gripper width,
    # joints 7, gripper action; action = absolute EE pos 3 + Euler 3 + gripper.
    "Traly/calvin_abc_d-lerobot": {
        "observation.images.top": "video",
        "observation.images.wrist": "video",
        "observation.state": (15,),
        "action": (7,),
    },
    # lerobot envs/configs.py MetaworldEnv.features_map (top camera -> observation.image, agent_pos 4, action 4).
    "lerobot/metaworld_mt50": {"observation.image": "video", "observation.state": (4,), "action": (4,)},
    # vla_recipes.data.collect's MetaWorld features (a camera stored as images, read like a video key here).
    "local/mw_reach_224": {"observation.image": "video", "observation.state": (4,), "action": (4,)},
}
# openpi's BEHAVIOR state (src/openpi/policies/b1k_policy.py, behavior branch of wensi-ai/openpi): base_qvel, trunk,
# left arm, right arm qpos, then both fingers of each gripper (openpi sums them), in BEHAVIOR-1K's 256-dim layout.
B1K_STATE = [*range(253, 256), *range(236, 240), *range(158, 165), *range(197, 204), 193, 194, 232, 233]
PI05_HYPERPARAMETERS = {  # openpi / LeRobot's pi0.5 and pi0 defaults
    "learning_rate": 2.5e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "weight_decay": 0.01,
    "warmup_steps": 1000,
    "max_grad_norm": 1.0,
    "bf16": True,
}


def parse(path: Path):
    """As on a GPU machine: TrainingArguments refuses bf16 on a CPU-only one unless told it is one."""
    return parse_recipe(["--config", str(path), "--use_cpu", "true"])


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_catalogue_is_complete() -> None:
    shipped = {name(p) for p in REAL}
    assert {f"recipes/pi05/libero/{mode}.yaml" for mode in ("full", "expert_only", "lora", "qlora")} <= shipped
    assert {f"recipes/openvla/libero_spatial/{mode}.yaml" for mode in ("full", "lora", "qlora")} <= shipped
    for folder in ("behavior1k", "maniskill", "metaworld", "custom", "calvin"):
        assert any(s.startswith(f"recipes/pi05/{folder}/") for s in shipped), folder
    for folder in ("libero", "maniskill"):
        assert any(s.startswith(f"recipes/pi0/{folder}/") for s in shipped), folder
    assert {f"recipes/openvla_oft/libero/{suite}.yaml" for suite in ("spatial", "object", "goal", "10")} <= shipped


@pytest.mark.parametrize("path", [p for p in REAL if "custom" not in p.parts], ids=name)
def test_real_recipe_names_features_its_dataset_has(path: Path) -> None:
    model_args, data_args, _ = parse(path)
    features = DATASETS[data_args.dataset_repo_id]
    meta = SimpleNamespace(
        camera_keys=[k for k, v in features.items() if v == "video"],
        features={k: {"shape": v} for k, v in features.items() if v != "video"},
    )
    cameras = resolve_camera_keys(meta, data_args)  # sft.py's own check: every named feature exists
    assert cameras == data_args.camera_keys
    if "openvla_oft" in path.parts:
        config = OpenVLAOFTConfig.from_openvla(OpenVLAConfig())
    elif "openvla" in path.parts:
        config = OpenVLAConfig()
    else:
        config = Pi05Config(pi05="pi0" not in path.parts)
    selected = state_selection(meta, data_args)  # sft.py's: the state dims the model sees (None: all)
    action_dim = features[data_args.action_key][0]
    state_dim = len(selected) if selected is not None else features[data_args.state_key][0]
    fields = {
        "action_dim": action_dim,
        "state_dim": state_dim,
        "norm_mode": data_args.norm_mode,
        "norm_stats": {},
        "state_indices": selected,
        "relative_action_mask": relative_action_mask(data_args, action_dim, state_dim),  # sft.py's check
    }
    get_family(config.model_type).configure(config, data_args, cameras, **fields)  # the dims fit the model
    assert config.action_dim == fields["action_dim"] and config.camera_keys == cameras
    assert config.state_indices == (B1K_STATE if "behavior1k" in path.parts else None)
    # CALVIN trains relative EE targets (state dims 0-5 are the action's EE pose), the gripper absolute.
    assert config.relative_action_mask == ([True] * 6 + [False] if "calvin" in path.parts else None)


def test_behavior1k_without_state_indices_is_refused_naming_the_key() -> None:
    """The 256-dim proprioception does not fit pi0.5's state slot; the error points at state_indices."""
    _, data_args, _ = parse(ROOT / "recipes/pi05/behavior1k/full.yaml")
    data_args.state_indices = None
    with pytest.raises(RecipeError, match="256 dims, more than the model's max_state_dim=32; .* state_indices"):
        get_family("pi05").configure(
            Pi05Config(), data_args, data_args.camera_keys, action_dim=23, state_dim=256, norm_mode=None, norm_stats={}
        )


@pytest.mark.parametrize("path", [p for p in REAL if not {"openvla", "openvla_oft"} & set(p.parts)], ids=name)
def test_pi05_recipes_use_openpi_hyperparameters(path: Path) -> None:
    model_args, data_args, args = parse(path)
    assert model_args.model_name_or_path == ("lerobot/pi0_base" if "pi0" in path.parts else "lerobot/pi05_base")
    assert {k: getattr(args, k) for k in PI05_HYPERPARAMETERS} == PI05_HYPERPARAMETERS
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": 2.5e-6}
    assert data_args.action_horizon == 50 and model_args.dtype == "bfloat16"
    assert data_args.norm_mode == ("mean_std" if "pi0" in path.parts else "quantiles")


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_openvla_libero_recipes_use_the_papers_settings(mode: str) -> None:
    model_args, data_args, args = parse(ROOT / f"recipes/openvla/libero_spatial/{mode}.yaml")
    assert model_args.model_name_or_path == "openvla/openvla-7b"  # the published checkpoint, loaded as it is
    assert model_args.finetune_mode == mode and data_args.image_augmentation and data_args.action_horizon == 1
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16
    if mode != "full":  # OpenVLA's LoRA fine-tunes: r 32, alpha min(r, 16), dropout 0, lr 5e-4 constant
        assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (32, 16, 0.0)
        assert args.learning_rate == 5e-4 and args.lr_scheduler_type == "constant"


@pytest.mark.parametrize("suite", ["spatial", "object", "goal", "10"])
def test_openvla_oft_libero_recipes_use_the_papers_settings(suite: str) -> None:
    """openvla-oft's LIBERO.md command and finetune.py defaults: LoRA r 32 (alpha min(r, 16), dropout 0, gaussian),
    lr 5e-4 decayed 10x after 100K steps (MultiStepLR), AdamW's default weight decay, no clipping, batch 8 per GPU,
    image augmentation, two cameras + the 8-dim proprio state, chunks of 8 (constants.py's LIBERO values)."""
    model_args, data_args, args = parse(ROOT / f"recipes/openvla_oft/libero/{suite}.yaml")
    assert (model_args.model_name_or_path, model_args.model_type) == ("openvla/openvla-7b", "openvla_oft")
    assert model_args.finetune_mode == "lora" and model_args.lora_init_weights == "gaussian"
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (32, 16, 0.0)
    assert args.learning_rate == 5e-4 and args.lr_scheduler_type == "warmup_stable_decay"
    assert args.lr_scheduler_kwargs == {"num_stable_steps": 100_000, "num_decay_steps": 1, "min_lr_ratio": 0.1}
    assert (args.weight_decay, args.max_grad_norm, args.warmup_steps) == (0.01, 0.0, 0)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8 and args.bf16
    assert args.max_steps == (50_000 if suite == "goal" else 150_000)  # LIBERO.md: 50K best on Goal, else 150K
    assert data_args.camera_keys == ["observation.images.image", "observation.images.wrist_image"]
    assert (data_args.state_key, data_args.action_horizon, data_args.norm_mode) == (
        "observation.state",
        8,
        "bounds_q99",
    )
    assert data_args.image_augmentation
    config = get_family("openvla_oft").adopt_config(OpenVLAConfig())
    get_family("openvla_oft").configure(
        config, data_args, data_args.camera_keys, action_dim=7, state_dim=8, norm_mode="bounds_q99", norm_stats={}
    )
    assert (config.num_images, config.state_dim, config.num_action_tokens) == (2, 8, 56)
