"""The ``vla-recipes`` command: ``vla-recipes sft|evaluate|rollout|serve [arguments]``.

Each subcommand takes the arguments of its script in ``recipes/`` (``vla-recipes sft --config recipe.yaml`` is
``python recipes/sft.py --config recipe.yaml``). Several processes, as ``accelerate launch`` starts them, run it as
a module::

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m vla_recipes.cli sft --config recipe.yaml
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from vla_recipes.configs import RecipeError

COMMANDS = {
    "sft": "fine-tune a policy on a LeRobot dataset (a recipe YAML)",
    "evaluate": "open-loop evaluation of a saved policy on held-out episodes",
    "rollout": "closed-loop rollouts in a LeRobot gym environment",
    "serve": "serve a policy over openpi's WebSocket protocol",
}


def run_main(main: Callable[[list[str] | None], object], args: Sequence[str] | None = None) -> None:
    """Run a command's ``main``; a bad argument (a ``RecipeError``) exits with its one line, no traceback."""
    try:
        main(None if args is None else list(args))
    except RecipeError as e:
        sys.exit(f"error: {e}")


def main(args: Sequence[str] | None = None) -> None:
    """``vla-recipes <command> ...``: the command's module is imported only when named (``serve`` needs
    websockets, ``rollout`` LeRobot's envs)."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<9} {what}" for name, what in COMMANDS.items())
        usage = f"usage: vla-recipes {{{','.join(COMMANDS)}}} [arguments]\n\ncommands:\n{listing}\n"
        if args and args[0] in ("-h", "--help"):
            print(usage + "\n`vla-recipes <command> --help` lists a command's arguments.")
            return
        sys.exit(usage + (f"\nerror: unknown command {args[0]!r}" if args else ""))
    command = importlib.import_module(f"vla_recipes.cli.{args[0]}")
    sys.argv[0] = f"vla-recipes {args[0]}"  # argparse's usage line names the subcommand
    run_main(command.main, args[1:])
