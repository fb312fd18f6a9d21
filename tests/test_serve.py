"""The policy server (``recipes/serve.py``, ``vla_recipes.serving``) with the real, unmodified ``openpi-client``.

``openpi-client`` pins ``numpy<2`` but only uses numpy APIs that numpy 2 keeps; ``make install`` installs it with
``--no-deps`` so these tests run it as a robot would, against servers bound to 127.0.0.1 on free ports and always
stopped. Models: tiny random ones of both families, saved with their processors and loaded back with AutoModel.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import http.client
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
import torch
import websockets
from cli import DEMOS, ROOT, free_port, started
from websockets.sync.client import connect

from vla_recipes.configs import RecipeError

try:  # the robot side: the real openpi client, unmodified
    from openpi_client import msgpack_numpy
    from openpi_client.action_chunk_broker import ActionChunkBroker
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
except ImportError as e:
    raise ImportError(f"{e}: these tests need openpi-client: pip install dm-tree && pip install --no-deps "
                      "openpi-client==0.1.2 (make install does)") from e  # fmt: skip
from vla_recipes.serving import ObservationSpec, PolicyServer, ServedPolicy, seeded_noise

CAMERAS = ("observation.images.image", "observation.images.wrist_image")
TASK = "move the gripper to the red cube"


def save_tiny(family_name: str, folder: Path, data_root: str, cameras: list[str], horizon: int) -> Path:
    """A randomly initialised tiny model of the demo recipe's size, saved with its processor (no training: serving
    only needs actions that come from the model)."""
    from vla_recipes.configs import DataArguments, ModelArguments
    from vla_recipes.data.lerobot import dataset_norm_stats, load_metadata
    from vla_recipes.families import get_family
    from vla_recipes.finetuning import load_config, load_model

    data_args = DataArguments(
        dataset_repo_id="local/synthetic_reach", dataset_root=data_root, action_horizon=horizon, camera_keys=cameras
    )
    family = get_family(family_name)
    model_config = DEMOS[family_name]["model_config"]
    if family_name == "pi05":
        model_config = {**model_config, "num_inference_steps": 3}  # fewer Euler steps: the same code, a third the time
    model_args = ModelArguments(model_config=model_config)
    config = load_config(model_args)
    norm_mode = family.default_norm_mode(config)
    mask = family.default_action_norm_mask(7)
    stats = dataset_norm_stats(load_metadata(data_args), data_args, norm_mode, mask)
    family.configure(config, data_args, cameras, action_dim=7, state_dim=8, norm_mode=norm_mode, norm_stats=stats)
    torch.manual_seed(0)
    model = load_model(model_args, config, family.model_class, str(folder))
    model.save_pretrained(folder)
    family.build_processor(model.config, model_args).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, two_camera_root) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {
        "openvla": save_tiny("openvla", root / "openvla", two_camera_root, [CAMERAS[0]], horizon=2),
        "pi05": save_tiny("pi05", root / "pi05", two_camera_root, list(CAMERAS), horizon=4),
    }


@functools.cache
def load(folder: Path):
    """Model and processor as a user loads them; once per folder (servers and references share them read-only)."""
    from transformers import AutoModel, AutoProcessor

    import vla_recipes  # noqa: F401

    return AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@contextlib.contextmanager
def running(server: PolicyServer) -> Iterator[PolicyServer]:
    """The server in a background thread for the block; always stopped (and the thread joined) after it."""
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        assert server.ready.wait(60), "the server did not start"
        yield server
    finally:
        server.stop()
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"


def served(folder: Path, *, key_map=None, **kwargs) -> PolicyServer:
    model, processor = load(folder)
    policy = ServedPolicy(model, processor, ObservationSpec(model.config, key_map))
    return PolicyServer(policy, port=0, **kwargs)


def observation(seed: int, *, size=(64, 80), slash_style: bool = False) -> dict:
    """A robot's observation: two uint8 HWC cameras (not the model's size), an 8-dim state, the prompt."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in CAMERAS]
    state = rng.normal(size=8).astype(np.float32)
    if slash_style:  # openpi's LIBERO client
        return {"observation/image": images[0], "observation/wrist_image": images[1], "observation/state": state,
                "prompt": TASK}  # fmt: skip
    return {CAMERAS[0]: images[0], CAMERAS[1]: images[1], "observation.state": state, "prompt": TASK}


def in_process(folder: Path, observations: list[dict], seeds: list[int] | None = None) -> np.ndarray:
    """The reference: ``predict_action`` on the same inputs, one observation at a time (and the same noise)."""
    model, processor = load(folder)
    cameras = list(model.config.camera_keys)
    chunks = []
    for i, obs in enumerate(observations):
        if model.config.model_type == "openvla":
            inputs = processor(images=[obs[cameras[0]]], text=[obs["prompt"]])
        else:
            inputs = processor(images=[[obs[c] for c in cameras]], text=[obs["prompt"]], state=obs["observation.state"])
            inputs["noise"] = seeded_noise(model.config, seeds[i])[None]
        chunks.append(model.predict_action(**inputs)[0].numpy())
    return np.stack(chunks)


def test_healthz_metadata_and_actions_equal_in_process_for_both_families(models):
    """openpi's client, unmodified: metadata on connect, then chunks equal to in-process ``predict_action`` (pi0.5
    with the same seeded noise), images at any size, the model's keys and openpi's slash keys alike."""
    observations = [observation(0), observation(1, size=(48, 48), slash_style=True), observation(2, size=(100, 60))]
    for family, folder in models.items():
        with running(served(folder)) as server:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request("GET", "/healthz")
            assert connection.getresponse().status == 200
            client = WebsocketClientPolicy("127.0.0.1", server.port)
            metadata = client.get_server_metadata()
            expected = {"model_type": family, "action_dim": 7, "action_horizon": 2 if family == "openvla" else 4}
            assert {k: metadata[k] for k in expected} == expected
            assert metadata["state_dim"] == (None if family == "openvla" else 8)
            assert metadata["camera_keys"] == ([CAMERAS[0]] if family == "openvla" else list(CAMERAS))
            assert metadata["takes_seed"] == (family == "pi05")
            results = [client.infer({**obs, "seed": 10 + i}) for i, obs in enumerate(observations)]
        for result in results:
            assert result["actions"].dtype == np.float32 and result["server_timing"]["infer_ms"] > 0
        assert "prev_total_ms" in results[1]["server_timing"]  # openpi's timing of the previous round trip
        canonical = [observation(0), observation(1, size=(48, 48)), observation(2, size=(100, 60))]
        reference = in_process(folder, canonical, seeds=[10, 11, 12])
        np.testing.assert_allclose(np.stack([r["actions"] for r in results]), reference, rtol=1e-5, atol=1e-6)
        assert len({r["actions"].tobytes() for r in results}) == 3  # the observations do matter


def concurrently(clients: list, requests: list[dict]) -> list[dict]:
    """Each client's ``infer`` of its request, all at once (one thread each), as robots call a shared server."""
    results: list = [None] * len(clients)

    def ask(i: int) -> None:
        results[i] = clients[i].infer(requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_two_clients_at_once_share_one_batch_and_get_their_own_answers(models):
    """Two concurrent clients' requests run as one batched call (batch_size 2) and each gets what it would get alone;
    for pi0.5 the same seed gives the same chunk whatever the batch."""
    for folder in models.values():
        observations = [observation(3), observation(4)]
        # max_wait long enough that the first request always waits for the second: the batch is certain
        with running(served(folder, max_batch=2, max_wait_ms=30_000)) as server:
            clients = [WebsocketClientPolicy("127.0.0.1", server.port) for _ in observations]
            results = concurrently(clients, [{**obs, "seed": 7 + i} for i, obs in enumerate(observations)])
        assert [r["server_timing"]["batch_size"] for r in results] == [2, 2]
        reference = in_process(folder, observations, seeds=[7, 8])
        np.testing.assert_allclose(np.stack([r["actions"] for r in results]), reference, rtol=1e-5, atol=1e-6)


def test_robot_loop_with_action_chunk_broker(models):
    """The README's robot loop: ``ActionChunkBroker`` asks the server once per chunk and hands out its steps."""
    folder = models["pi05"]
    with running(served(folder)) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        horizon = client.get_server_metadata()["action_horizon"]
        broker = ActionChunkBroker(client, action_horizon=horizon)
        steps = [
            broker.infer({**observation(t // horizon), "seed": t // horizon})["actions"] for t in range(2 * horizon)
        ]
    reference = in_process(folder, [observation(0), observation(1)], seeds=[0, 1])
    np.testing.assert_allclose(np.stack(steps), reference.reshape(2 * horizon, 7), rtol=1e-5, atol=1e-6)


def test_key_map_for_nested_openpi_observations(models):
    """ALOHA-style nested observations ({"images": {"cam_high": ...}}) reach the model through a key map."""
    folder = models["openvla"]
    obs = observation(5)
    key_map = {"images/cam_high": CAMERAS[0], "instruction": "prompt"}
    with running(served(folder, key_map=key_map)) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        assert client.get_server_metadata()["key_map"]["images/cam_high"] == CAMERAS[0]
        result = client.infer({"images": {"cam_high": obs[CAMERAS[0]]}, "state": obs["observation.state"],
                               "instruction": TASK})  # fmt: skip
    np.testing.assert_allclose(result["actions"], in_process(folder, [obs])[0], rtol=1e-5, atol=1e-6)

    model, processor = load(folder)
    with pytest.raises(ValueError, match=r"--key_map maps to \['observation.images.top'\], which the model does not"):
        ObservationSpec(model.config, {"images/top": "observation.images.top"})


BAD_REQUESTS = [
    ("missing camera", lambda o: {k: v for k, v in o.items() if k != CAMERAS[1]},
     "missing camera 'observation.images.wrist_image'"),
    ("wrong state dim", lambda o: {**o, "observation.state": np.zeros(5, np.float32)},
     "'observation.state' has 5 dims; this model takes 8"),
    ("non-uint8 image", lambda o: {**o, CAMERAS[0]: o[CAMERAS[0]].astype(np.float32) / 255},
     "camera 'observation.images.image': images are uint8 arrays"),
    ("grey image", lambda o: {**o, CAMERAS[0]: o[CAMERAS[0]][..., 0]},
     "camera 'observation.images.image': expected an RGB image"),
    ("state NaN", lambda o: {**o, "observation.state": np.full(8, np.nan, np.float32)}, "finite numbers"),
    ("no prompt", lambda o: {k: v for k, v in o.items() if k != "prompt"}, "missing 'prompt'"),
    ("huge prompt", lambda o: {**o, "prompt": "x" * 100_000}, "'prompt' must be a string of at most"),
    ("bad seed", lambda o: {**o, "seed": -1}, "'seed' must be an integer"),
    ("not a dict", lambda o: [1, 2, 3], "a request is a dict of observations, not list"),
]  # fmt: skip


def array_map(data: bytes, dtype: str, shape: list[int]) -> dict:
    """An array as openpi packs it, with whatever fields a broken client might send."""
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def test_bad_requests_get_an_error_frame_and_the_connection_stays_up(models):
    folder = models["pi05"]
    good = {**observation(6), "seed": 0}
    with running(served(folder, max_message_bytes=2**20)) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        for name, make, message in BAD_REQUESTS:
            with pytest.raises(RuntimeError, match="bad request: ") as error:
                client.infer(make(good))
            assert message in str(error.value), name
        first = client.infer(good)["actions"]  # the same connection still answers

        with connect(f"ws://127.0.0.1:{server.port}") as raw:  # what the openpi client cannot send
            raw.recv()
            for frame, message in [
                (b"\xc1garbage", "not a msgpack-numpy message"),
                (msgpack_numpy.packb({"x": 1})[:-1], "not a msgpack-numpy message"),
                ("some text", "send observations as binary msgpack frames"),
                (msgpack.packb({"x": array_map(b"a", "<f8", [5])}), "buffer is too small"),
                (msgpack.packb({"x": array_map(b"\0" * 8, "|O", [1])}), "unsupported dtype: object"),
            ]:
                raw.send(frame)
                answer = raw.recv()
                assert isinstance(answer, str) and answer.startswith("bad request: ") and message in answer, answer
            raw.send(msgpack_numpy.packb(good))
            np.testing.assert_array_equal(msgpack_numpy.unpackb(raw.recv())["actions"], first)

        with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as raw:  # a frame over the limit: 1009, closed
            raw.recv()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                raw.send(b"\0" * (100 * 2**20))
                raw.recv()
            assert closed.value.rcvd.code == 1009
        np.testing.assert_array_equal(client.infer(good)["actions"], first)  # other clients never noticed


def test_a_client_that_disconnects_mid_request_does_not_break_the_batch(models):
    folder = models["openvla"]
    obs = observation(8)
    with running(served(folder, max_batch=2, max_wait_ms=30_000)) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        with connect(f"ws://127.0.0.1:{server.port}") as quitter:
            quitter.recv()
            quitter.send(msgpack_numpy.packb(observation(9)))  # queued, waiting for a batch partner; then gone
        result = client.infer(obs)
        assert result["server_timing"]["batch_size"] == 2  # computed along with the departed client's request
    np.testing.assert_allclose(result["actions"], in_process(folder, [obs])[0], rtol=1e-5, atol=1e-6)


def test_api_key_is_checked_on_connect(models):
    with running(served(models["openvla"], api_key="s3cret")) as server:
        for key in (None, "wrong"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                WebsocketClientPolicy("127.0.0.1", server.port, api_key=key)
            assert refused.value.response.status_code == 401
        client = WebsocketClientPolicy("127.0.0.1", server.port, api_key="s3cret")
        assert client.infer(observation(0))["actions"].shape == (2, 7)


def test_graceful_shutdown_answers_the_request_in_flight(models):
    """On stop, a request still waiting for a batch partner is answered, then connections close with 1001."""
    server = served(models["openvla"], max_batch=2, max_wait_ms=60_000)
    with running(server), connect(f"ws://127.0.0.1:{server.port}") as robot:
        idle = WebsocketClientPolicy("127.0.0.1", server.port)  # connected, so a partner may come: the request waits
        robot.recv()
        robot.send(msgpack_numpy.packb(observation(0)))
        deadline = time.monotonic() + 60
        while server.in_flight == 0 and time.monotonic() < deadline:  # received, waiting for a partner
            time.sleep(0.01)
        server.stop()
        answer = msgpack_numpy.unpackb(robot.recv())
        assert answer["server_timing"]["batch_size"] == 1 and answer["actions"].shape == (2, 7)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            robot.recv()
        assert closed.value.rcvd.code == 1001
        with pytest.raises(websockets.ConnectionClosed):
            idle.infer(observation(1))


def test_serve_script_binds_localhost_serves_and_stops_on_sigterm(models, tmp_path):
    port = free_port()
    command = [sys.executable, str(ROOT / "recipes/serve.py"), "--model", str(models["pi05"]), "--port", str(port)]
    with started([*command, "--max_batch", "4"], tmp_path / "server.log") as proc:
        deadline = time.monotonic() + 120
        while True:  # up once /healthz answers
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.2)
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"]
        assert [(address.ip, address.port) for address in listening] == [("127.0.0.1", port)]
        client = WebsocketClientPolicy("127.0.0.1", port)
        result = client.infer({**observation(0), "seed": 3})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    np.testing.assert_allclose(result["actions"], in_process(models["pi05"], [observation(0)], [3])[0], rtol=1e-5)
    assert "shutting down" in (tmp_path / "server.log").read_text()

    from vla_recipes.cli import serve  # what recipes/serve.py runs

    for args, message in [
        (["--key_map", "images/top=observation.images.top"], r"--key_map maps to \['observation.images.top'\], which"),
        (["--key_map", "images/top"], "--key_map item 'images/top' is not client_key=model_key"),
        (["--max_batch", "0"], "--max_batch must be >= 1"),
    ]:
        with pytest.raises(RecipeError, match=message):
            serve.build_server(serve.parse_args(["--model", str(models["pi05"]), *args]))
    assert serve.parse_args(["--model", "m"]).host == "127.0.0.1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(
            RecipeError, match=r"cannot listen on 127.0.0.1:\d+ \(Address already in use\); pick another"
        ):
            serve.main(["--model", str(models["openvla"]), "--port", str(taken.getsockname()[1])])


def test_serves_a_lora_output_folder(models, tmp_path):
    """A LoRA folder (adapter + config + processor, the base named in adapter_config.json) loads through serve.py's
    own loading and serves the adapted model: the base's actions changed by the adapter."""
    from peft import LoraConfig, get_peft_model

    base, processor = load(models["openvla"])
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=base.lora_target_modules()))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (no change): make the adapter matter
            torch.nn.init.normal_(param, std=0.5)
    folder = tmp_path / "lora"
    peft_model.save_pretrained(folder)
    base.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(models["openvla"])  # built here, not loaded: PEFT left it empty
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))

    from vla_recipes.cli import serve  # what recipes/serve.py runs

    obs = observation(11)
    with running(serve.build_server(serve.parse_args(["--model", str(folder), "--port", "0"]))) as server:
        served_actions = WebsocketClientPolicy("127.0.0.1", server.port).infer(obs)["actions"]
    inputs = processor(images=[obs[CAMERAS[0]]], text=[TASK])
    with torch.no_grad():
        adapted = peft_model.base_model.model.predict_action(**inputs)[0].numpy()
    np.testing.assert_allclose(served_actions, adapted, rtol=1e-4, atol=1e-5)
    assert not np.allclose(served_actions, in_process(models["openvla"], [obs])[0])
