"""OpenVLA-OFT; importing this package registers it with transformers' Auto* classes (model_type ``openvla_oft``)."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from ..openvla import OpenVLAImageProcessor
from .configuration_openvla_oft import TINY_OPENVLA_OFT_CONFIG, OpenVLAOFTConfig
from .modeling_openvla_oft import (
    L1RegressionActionHead,
    OpenVLAOFTForActionPrediction,
    ProprioProjector,
    parallel_decoding_mask,
)
from .processing_openvla_oft import OpenVLAOFTProcessor

AutoConfig.register(OpenVLAOFTConfig.model_type, OpenVLAOFTConfig, exist_ok=True)
AutoModel.register(OpenVLAOFTConfig, OpenVLAOFTForActionPrediction, exist_ok=True)
AutoImageProcessor.register(
    OpenVLAOFTConfig,
    image_processor_classes={"torchvision": OpenVLAImageProcessor, "pil": OpenVLAImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(OpenVLAOFTConfig, OpenVLAOFTProcessor, exist_ok=True)

__all__ = [
    "TINY_OPENVLA_OFT_CONFIG",
    "L1RegressionActionHead",
    "OpenVLAOFTConfig",
    "OpenVLAOFTForActionPrediction",
    "OpenVLAOFTProcessor",
    "ProprioProjector",
    "parallel_decoding_mask",
]
