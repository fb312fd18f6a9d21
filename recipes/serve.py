"""Serve a fine-tuned policy to robots over openpi's WebSocket protocol (``vla-recipes serve``).

    python recipes/serve.py --model outputs/demo-pi05                       # ws://127.0.0.1:8000, /healthz

``python recipes/serve.py --help`` lists the arguments; the server is :class:`vla_recipes.serving.PolicyServer`.
"""

from vla_recipes.cli import run_main
from vla_recipes.cli.serve import main

if __name__ == "__main__":
    run_main(main)
