"""pi0.5 and pi0: PaliGemma + a Gemma action expert trained by flow matching (LeRobot-compatible checkpoints).

Importing this package registers the classes with transformers' Auto* factories (model_type ``pi05``).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_pi05 import TINY_PI0_CONFIG, TINY_PI05_CONFIG, Pi05Config
from .image_processing_pi05 import Pi05ImageProcessor
from .modeling_pi05 import Pi05ForActionPrediction, Pi05Output
from .processing_pi05 import Pi05Processor

AutoConfig.register(Pi05Config.model_type, Pi05Config, exist_ok=True)
AutoModel.register(Pi05Config, Pi05ForActionPrediction, exist_ok=True)
AutoImageProcessor.register(Pi05Config, image_processor_classes={"torchvision": Pi05ImageProcessor}, exist_ok=True)
AutoProcessor.register(Pi05Config, Pi05Processor, exist_ok=True)

__all__ = [
    "TINY_PI05_CONFIG",
    "TINY_PI0_CONFIG",
    "Pi05Config",
    "Pi05ForActionPrediction",
    "Pi05ImageProcessor",
    "Pi05Output",
    "Pi05Processor",
]
