"""``python -m vla_recipes.cli`` (and ``accelerate launch -m vla_recipes.cli``) is the ``vla-recipes`` command."""

from vla_recipes.cli import main

main()
