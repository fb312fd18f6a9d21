"""Serve a fine-tuned policy to robots over openpi's WebSocket protocol, batching concurrent clients.

    python recipes/serve.py --model outputs/demo-pi05                       # ws://127.0.0.1:8000, /healthz
    VLA_SERVE_API_KEY=... vla-recipes serve --model me/pi05-libero --host 0.0.0.0 --device cuda

A robot connects with ``openpi_client.websocket_client_policy.WebsocketClientPolicy(host, port)`` and calls
``infer(observation)``: images uint8 HWC at any size under the model's camera keys (or openpi's ``observation/<cam>``;
others through ``--key_map``), ``observation.state`` in the dataset's units, ``prompt``, optionally ``seed``; the
answer's ``actions`` is a (action_horizon, action_dim) chunk in the dataset's units. Requests arriving within
``--max_wait_ms`` of each other run as one batched ``predict_action`` (``--max_batch 1``: one at a time). The server
binds 127.0.0.1 unless ``--host`` says otherwise; SIGTERM / Ctrl-C stop it gracefully.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

import vla_recipes  # noqa: F401  (registers the models with the Auto classes)
from vla_recipes.configs import RecipeError
from vla_recipes.serving import ObservationSpec, PolicyServer, ServedPolicy, parse_key_map
from vla_recipes.serving.server import DEFAULT_MAX_MESSAGE_BYTES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="Output folder (a LoRA one too) or Hub id of a fine-tuned model."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind; 0.0.0.0 exposes it to the network.")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32."
    )
    parser.add_argument("--max_batch", type=int, default=8, help="Most requests per model call (1: no batching).")
    parser.add_argument("--max_wait_ms", type=float, default=5.0, help="How long a request waits for others to join.")
    parser.add_argument(
        "--key_map", default=None, help="client_key=model_key,... e.g. observation/top=observation.images.top"
    )
    parser.add_argument("--default_prompt", default=None, help="The task when a request has no prompt.")
    parser.add_argument(
        "--api_key",
        default=os.environ.get("VLA_SERVE_API_KEY"),
        help="Refuse connections without 'Authorization: Api-Key <key>' (default: $VLA_SERVE_API_KEY).",
    )
    parser.add_argument(
        "--max_message_mb",
        type=float,
        default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
        help="Larger frames close their connection (code 1009).",
    )
    parser.add_argument("--seed", type=int, default=None, help="Seeds the noise of requests that send no seed.")
    return parser.parse_args(args)


def build_server(cli: argparse.Namespace) -> PolicyServer:
    """Check the arguments, load the model and processor, and return the (not yet running) server."""
    if cli.max_batch < 1 or cli.max_wait_ms < 0:
        raise RecipeError(f"--max_batch must be >= 1 and --max_wait_ms >= 0 (got {cli.max_batch}, {cli.max_wait_ms})")
    if cli.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda but no CUDA device is visible; pass --device cpu")
    try:
        key_map = parse_key_map(cli.key_map)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    try:  # from the config alone: a bad key map fails before the weights load
        spec = ObservationSpec(AutoConfig.from_pretrained(cli.model), key_map, cli.default_prompt)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    dtype = DTYPES.get(cli.dtype, torch.bfloat16 if cli.device.startswith("cuda") else torch.float32)
    model = AutoModel.from_pretrained(cli.model, dtype=dtype).to(cli.device).eval()
    processor = AutoProcessor.from_pretrained(cli.model)
    return PolicyServer(
        ServedPolicy(model, processor, spec, seed=cli.seed),
        host=cli.host,
        port=cli.port,
        max_batch=cli.max_batch,
        max_wait_ms=cli.max_wait_ms,
        api_key=cli.api_key,
        max_message_bytes=int(cli.max_message_mb * 2**20),
    )


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    cli = parse_args(args)
    server = build_server(cli)
    try:
        server.run()
    except OSError as e:  # the port is taken, the host is not this machine's
        reason = os.strerror(e.errno) if e.errno else e
        raise RecipeError(f"cannot listen on {cli.host}:{cli.port} ({reason}); pick another --port or --host") from None
    print("server stopped", flush=True)
