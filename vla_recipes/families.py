"""The model-family registry: what generic code (training, evaluation, FSDP, the frame cache, the model card) needs
to know about a model family, keyed by ``config.model_type``.

A family is one folder, ``vla_recipes/models/<family>/``: its model files plus a ``family.py`` that subclasses
:class:`Family` and calls :func:`register_family`. Importing ``vla_recipes`` imports every such ``family.py``
(:func:`discover_families`), so adding a family edits nothing outside its folder (and its recipes). A family
defined outside this package (a plugin, a notebook, a test) registers the same way; ``recipes/sft.py`` and the
other scripts import the modules named in ``$VLA_RECIPES_FAMILIES`` (comma-separated) or advertised under the
``vla_recipes.families`` entry-point group of an installed distribution, so a family that is not in this
repository trains through the same scripts.

:func:`register_family` checks the declaration when it is made: an incomplete family fails at import with one line
naming what is missing, never after a run has trained.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar

from transformers import AutoProcessor, PretrainedConfig, PreTrainedModel

from vla_recipes.models.adapters import AdapterFolderMixin

if TYPE_CHECKING:
    from vla_recipes.configs import DataArguments, ModelArguments, RecipeError
    from vla_recipes.data.frame_cache import FrameResize
    from vla_recipes.trainers.base import VLATrainer

# Where out-of-tree families are named: an env var for a module on the path, an entry-point group for a package.
FAMILIES_ENV = "VLA_RECIPES_FAMILIES"
ENTRY_POINT_GROUP = "vla_recipes.families"


class Family:
    """One model family's declaration. Subclasses set the class attributes of :attr:`REQUIRED` and override the
    methods of :attr:`REQUIRED_METHODS`; the others have defaults that fit most families."""

    # Declarations every family makes (checked by register_family).
    REQUIRED: ClassVar[tuple[str, ...]] = (
        "model_type",
        "config_class",
        "model_class",
        "processor_class",
        "image_processor_class",
        "fsdp_blocks",
        "frame_resize",
        "tiny_config",
    )
    REQUIRED_METHODS: ClassVar[tuple[str, ...]] = (
        "default_norm_mode",
        "offline_tokenizer",
        "new_processor",
        "make_trainer",
        "check_prompts",
    )

    model_type: ClassVar[str]
    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]
    processor_class: ClassVar[type]  # a ProcessorMixin: AutoProcessor's class, and remote code's
    image_processor_class: ClassVar[type]  # AutoImageProcessor's class
    # The module classes that become FSDP2 units instead of accelerate's default (the model's _no_split_modules).
    fsdp_blocks: ClassVar[tuple[str, ...]]
    # The processor's first image step, done once in the frame cache (FrameResize.mode: "square_bicubic",
    # "fit_bilinear"), at ``config.image_size``; None: frames are cached at their native size.
    frame_resize: ClassVar[str | None]
    # A tiny random config's ``model_config`` fields (tests, CPU demos), without ``model_type``.
    tiny_config: ClassVar[dict[str, Any]]

    supported_modes: ClassVar[tuple[str, ...]] = ("full", "lora", "qlora")
    # ``"type"`` values of LeRobot policy folders (config.json without model_type) this family's config reads.
    lerobot_policy_types: ClassVar[tuple[str, ...]] = ()
    # Actions come from generated LM tokens (``generate_action_ids`` + ``actions_from_ids``): evaluation scores them.
    decodes_action_tokens: ClassVar[bool] = False

    @property
    def auto_classes(self) -> dict[str, type]:
        """The Auto class -> this family's class, as registered with transformers and written for remote code."""
        return {
            "AutoConfig": self.config_class,
            "AutoModel": self.model_class,
            "AutoImageProcessor": self.image_processor_class,
            "AutoProcessor": self.processor_class,
        }

    def default_norm_mode(self, config: PretrainedConfig) -> str:
        raise NotImplementedError

    def default_action_norm_mask(self, action_dim: int) -> list[bool] | None:
        return None

    def takes_state(self, config: PretrainedConfig) -> bool:
        """Whether the processor takes the robot state at inference (the model card's usage snippet shows it)."""
        return bool(getattr(config, "state_dim", None))

    def frame_resize_for(self, config: PretrainedConfig) -> FrameResize | None:
        from vla_recipes.data.frame_cache import FrameResize

        return None if self.frame_resize is None else FrameResize(self.frame_resize, config.image_size)

    def adopt_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The config to train from a model folder of another family (e.g. OpenVLA-OFT from openvla-7b); by default
        the folder's own config, which ``check_model_type`` then compares with the recipe."""
        return config

    def modules_to_save(self, model: PreTrainedModel) -> list[str] | None:
        """Modules trained in full next to LoRA adapters (new heads a LoRA cannot express)."""
        return None

    def offline_tokenizer(self, config: PretrainedConfig):
        """A tokenizer built locally for a randomly initialised model (no network): tests, CPU demos."""
        raise NotImplementedError

    def build_processor(self, config: PretrainedConfig, model_args: ModelArguments):
        """The processor: saved with a pretrained model, built from the config for a random one."""
        if model_args.model_name_or_path is not None:
            return AutoProcessor.from_pretrained(
                model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
            )
        return self.new_processor(config, model_args.tokenizer_name_or_path)

    def new_processor(self, config: PretrainedConfig, tokenizer_name_or_path: str | None):
        """A processor for ``config``; its tokenizer from ``tokenizer_name_or_path``, else :meth:`offline_tokenizer`."""
        raise NotImplementedError

    def tokenizer(self, config: PretrainedConfig, tokenizer_name_or_path: str | None):
        """The named tokenizer (a Hub id or folder), else :meth:`offline_tokenizer` (random-init runs, no network)."""
        if tokenizer_name_or_path:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(tokenizer_name_or_path)
        return self.offline_tokenizer(config)

    def configure(
        self,
        config: PretrainedConfig,
        data_args: DataArguments,
        camera_keys: list[str],
        *,
        action_dim: int,
        state_dim: int | None,
        norm_mode: str,
        norm_stats: dict,
        state_indices: list[int] | None = None,
        relative_action_mask: list[bool] | None = None,
        default_unnorm_key: str | None = None,
    ) -> None:
        """Write what the model must remember about the data into its config (saved with the weights).
        ``state_indices``: the dims of the dataset's state the model sees (None: all); the processor takes those.
        ``relative_action_mask``: the action dims trained relative to the state (None: absolute actions).
        ``default_unnorm_key``: a mixture's heaviest dataset, whose statistics inference uses by default."""
        config.camera_keys, config.action_horizon, config.action_dim = camera_keys, data_args.action_horizon, action_dim
        config.state_indices = state_indices
        config.relative_action_mask = relative_action_mask
        config.default_unnorm_key = default_unnorm_key
        config.norm_mode, config.norm_stats = norm_mode, norm_stats

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset) -> VLATrainer:
        raise NotImplementedError

    @staticmethod
    def trainer_with_collator(
        trainer_class: type[VLATrainer], *, model, args, processor, train_dataset, eval_dataset, seeded_draws=None, **kw
    ) -> VLATrainer:
        """``trainer_class`` with the one collator over ``processor``, pointed at the run's statistics (the model
        config's, which ``configure`` wrote). ``seeded_draws``: per-sample tensors the collator adds (pi0.5's noise)."""
        from vla_recipes.data.collators import VLADataCollator

        processor.set_model_config(model.config)
        return trainer_class(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=VLADataCollator(processor, seeded_draws=seeded_draws),
            processing_class=processor,
            **kw,
        )

    def check_prompts(self, processor, config: PretrainedConfig, tasks: list[str]) -> None:
        """Refuse, before the weights load, a task whose prompt does not fit the model's sequence."""
        raise NotImplementedError

    @staticmethod
    def _too_long(task: str, tokens: int, limit: str, fix: str) -> RecipeError:
        from vla_recipes.configs import RecipeError

        shown = task if len(task) <= 60 else f"{task[:57]}..."
        return RecipeError(f"the prompt of the dataset task {shown!r} takes {tokens} tokens, more than {limit}; {fix}")


class FamilyDeclarationError(TypeError):
    """A family registered without something generic code needs; the message names the family and what."""


_FAMILIES: dict[str, Family] = {}


def register_family[F: (Family, type[Family])](family: F) -> F:
    """Add a family to the registry (a class is instantiated); usable as a class decorator, returns its argument.

    Fails at once, in one line naming the family and what it lacks, when a declaration is missing or of the wrong
    kind. Registering the same class again is a no-op (a module imported twice); another class under a taken
    model_type is an error."""
    declared = family
    family = family() if isinstance(family, type) else family
    name = getattr(family, "model_type", None) or type(family).__name__
    missing = [attr for attr in Family.REQUIRED if not hasattr(family, attr)]
    missing += [m for m in Family.REQUIRED_METHODS if getattr(type(family), m) is getattr(Family, m)]
    if missing:
        raise FamilyDeclarationError(f"family {name!r} declares no {', '.join(missing)}")
    for attr, kind in (("config_class", PretrainedConfig), ("model_class", PreTrainedModel)):
        if not (isinstance(getattr(family, attr), type) and issubclass(getattr(family, attr), kind)):
            raise FamilyDeclarationError(f"family {name!r}: {attr} must be a {kind.__name__} subclass")
    if family.config_class.model_type != family.model_type:
        raise FamilyDeclarationError(
            f"family {name!r}: config_class {family.config_class.__name__} has model_type "
            f"{family.config_class.model_type!r}; they must match (config.model_type picks the family)"
        )
    adapters = sorted(set(family.supported_modes) & {"lora", "qlora"})
    if adapters and not callable(getattr(family.model_class, "lora_target_modules", None)):
        raise FamilyDeclarationError(
            f"family {name!r} supports {'/'.join(adapters)} but {family.model_class.__name__} has no "
            "lora_target_modules() (the default LoRA targets)"
        )
    if adapters and not issubclass(family.model_class, AdapterFolderMixin):
        raise FamilyDeclarationError(
            f"family {name!r} supports {'/'.join(adapters)} but {family.model_class.__name__} does not inherit "
            "vla_recipes.models.adapters.AdapterFolderMixin (from_pretrained of an adapter folder)"
        )
    if not family.fsdp_blocks or isinstance(family.fsdp_blocks, str):
        raise FamilyDeclarationError(f"family {name!r}: fsdp_blocks must be a non-empty tuple of module class names")
    if family.frame_resize not in (None, "square_bicubic", "fit_bilinear"):
        raise FamilyDeclarationError(
            f"family {name!r}: frame_resize {family.frame_resize!r} is not None, 'square_bicubic' or 'fit_bilinear'"
        )
    previous = _FAMILIES.get(family.model_type)
    if previous is not None and type(previous).__qualname__ != type(family).__qualname__:
        raise FamilyDeclarationError(
            f"family {name!r} is already registered by {type(previous).__module__}.{type(previous).__qualname__}"
        )
    _FAMILIES[family.model_type] = family
    return declared


def families() -> dict[str, Family]:
    """Every registered family, by model_type (a copy: register with :func:`register_family`)."""
    return dict(_FAMILIES)


def get_family(model_type: str) -> Family:
    if model_type not in _FAMILIES:
        from vla_recipes.configs import RecipeError

        raise RecipeError(f"model_type {model_type!r} is not supported; supported: {sorted(_FAMILIES)}")
    return _FAMILIES[model_type]


def lerobot_policy_types() -> dict[str, type[PretrainedConfig]]:
    """LeRobot policy ``"type"`` names -> the config class that reads such a folder."""
    return {name: f.config_class for f in _FAMILIES.values() for name in f.lerobot_policy_types}


def discover_families() -> None:
    """Import every ``vla_recipes/models/<family>/family.py``, then the out-of-tree family modules named in
    ``$VLA_RECIPES_FAMILIES`` or under the ``vla_recipes.families`` entry-point group."""
    import vla_recipes.models

    for info in pkgutil.iter_modules(vla_recipes.models.__path__, prefix="vla_recipes.models."):
        if info.ispkg and importlib.util.find_spec(f"{info.name}.family") is not None:
            importlib.import_module(f"{info.name}.family")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()
    for module in filter(None, (m.strip() for m in os.environ.get(FAMILIES_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"${FAMILIES_ENV} names {module!r}, which cannot be imported ({e}); put its folder on PYTHONPATH"
            ) from None


def package_families() -> dict[str, Family]:
    """The registered families that live in this package (``vla_recipes/models/<family>/``), not plugins."""
    return {name: f for name, f in _FAMILIES.items() if type(f).__module__.startswith("vla_recipes.models.")}
