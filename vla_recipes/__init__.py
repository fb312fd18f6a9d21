"""vla-recipes: fine-tune VLA policies (OpenVLA, pi0.5) on LeRobot datasets with the Hugging Face stack.

Importing the package registers every model family (``vla_recipes/models/<family>/family.py``, and the out-of-tree
ones named in ``$VLA_RECIPES_FAMILIES`` or the ``vla_recipes.families`` entry points) and its models with
``AutoConfig``, ``AutoModel`` and ``AutoProcessor``.
"""

import logging

# bitsandbytes' CPU backend asks at import for a Hub kernel package it never needs here: not a user's concern.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

from vla_recipes.families import discover_families  # noqa: E402

discover_families()
