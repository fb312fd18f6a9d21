"""vla-recipes: fine-tune VLA policies (OpenVLA, pi0.5) on LeRobot datasets with the Hugging Face stack.

Importing the package registers its models with ``AutoConfig``, ``AutoModel`` and ``AutoProcessor``.
"""

from vla_recipes.models import openvla  # noqa: F401  (registers the Auto classes)

__version__ = "0.1.0"
