"""vla-recipes: fine-tune VLA policies (OpenVLA, pi0.5) on LeRobot datasets with the Hugging Face stack.

Importing the package registers its models with ``AutoConfig``, ``AutoModel`` and ``AutoProcessor``.
"""

import logging

# bitsandbytes' CPU backend asks at import for a Hub kernel package it never needs here: not a user's concern.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from vla_recipes.models import openvla, openvla_oft, pi05  # noqa: E402, F401  (registers the Auto classes)

__version__ = "0.1.0"
