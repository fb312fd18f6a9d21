"""One robot for benchmarks/serve.py, in its own process as a real one is: ``openpi_client``'s WebsocketClientPolicy.

    python benchmarks/_serve_client.py PORT OBSERVATIONS.npz REQUESTS OFFSET

Connects, sends one warm-up request, prints ``ready``, waits for a line on stdin, then sends REQUESTS observations
one after the other (each as soon as the previous answer is in) and prints their latencies in ms as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy


def main() -> None:
    port, path, requests, offset = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with np.load(path) as data:
        cameras = [key for key in data.files if key.startswith("observation.images.")]
        observations = [
            {**{key: data[key][i] for key in cameras}, "observation.state": data["observation.state"][i],
             "prompt": str(data["prompt"][i])}
            for i in range(len(data["prompt"]))
        ]  # fmt: skip
    client = WebsocketClientPolicy("127.0.0.1", port)
    client.infer(observations[0])
    print("ready", flush=True)
    sys.stdin.readline()
    latencies = []
    for step in range(requests):
        start = time.perf_counter()
        client.infer({**observations[(offset + step) % len(observations)], "seed": step})
        latencies.append((time.perf_counter() - start) * 1000)
    print(json.dumps(latencies), flush=True)


if __name__ == "__main__":
    main()
