"""OpenVLA; importing this package registers it with transformers' Auto* classes (model_type ``openvla``)."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .action_tokenizer import ActionTokenizer
from .configuration_openvla import TINY_OPENVLA_CONFIG, OpenVLAConfig
from .modeling_openvla import OpenVLAForActionPrediction
from .processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor, build_prompt

AutoConfig.register(OpenVLAConfig.model_type, OpenVLAConfig, exist_ok=True)
AutoModel.register(OpenVLAConfig, OpenVLAForActionPrediction, exist_ok=True)
# One implementation serves both backends transformers may ask for.
AutoImageProcessor.register(
    OpenVLAConfig,
    image_processor_classes={"torchvision": OpenVLAImageProcessor, "pil": OpenVLAImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(OpenVLAConfig, OpenVLAProcessor, exist_ok=True)

__all__ = [
    "TINY_OPENVLA_CONFIG",
    "ActionTokenizer",
    "OpenVLAConfig",
    "OpenVLAForActionPrediction",
    "OpenVLAImageProcessor",
    "OpenVLAProcessor",
    "build_prompt",
]
