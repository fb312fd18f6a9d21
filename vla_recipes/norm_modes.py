"""The normalisation modes a recipe may name (``norm_mode``), in one place.

Both the recipe check (``configs.py``) and the implementation (``data/normalize.py``) read them from here. It is a
module of its own, importing nothing of the package, because ``data/normalize.py`` travels with a saved model's
remote code (this file travels beside it) and ``configs.py`` sits below the data layer (it cannot import ``data/``).
"""

from __future__ import annotations

from typing import Literal, get_args

NormMode = Literal["bounds_q99", "quantiles", "mean_std", "min_max", "identity"]
NORM_MODES: tuple[str, ...] = get_args(NormMode)
