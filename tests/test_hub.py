"""Pushing to the Hub, tested offline against a stand-in Hub.

The stand-in (``http.server`` in a thread) speaks the endpoints huggingface_hub 1.x calls to check a token
(whoami-v2), create a repo (repos/create), validate a model card (validate-yaml) and commit files (preupload,
commit); it records every request, repo and commit, so the tests assert what a real push would upload. Runs
point ``HF_ENDPOINT`` at it (subprocesses) or patch ``huggingface_hub.constants.ENDPOINT`` (in process).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cli import DEMOS, ROOT, accelerate_launch

WRITE, READ = "hf_writewritewritewritewrite", "hf_readreadreadreadreadread"
# token -> whoami-v2 "auth.accessToken.role"; any other token is rejected with 401, as the Hub does.
TOKENS = {WRITE: "write", READ: "read"}
USER, ORG = "alice", "robots-lab"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Commit:
    repo_id: str
    message: str
    files: dict[str, bytes]


@dataclass
class StandInHub:
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)  # repo id -> the repos/create payload
    commits: list[Commit] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # endpoints the stand-in does not speak


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            hub.requests.append(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}, body))
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if path == "/api/whoami-v2":
                if token not in TOKENS:
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                access = {"displayName": "test", "role": TOKENS[token]}
                orgs = [{"name": ORG, "type": "org"}]
                return self._reply(200, {"type": "user", "name": USER, "orgs": orgs, "auth": {"accessToken": access}})
            if TOKENS.get(token) != "write":
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
                hub.repos[repo_id] = payload
                return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                errors = []
                match = re.match(r"---\n(.*?)\n---\n", content, re.S)
                try:
                    meta = yaml.safe_load(match.group(1)) if match else None
                except yaml.YAMLError as e:
                    meta, errors = None, [{"message": f"YAML: {e}"}]
                if not isinstance(meta, dict):
                    errors = errors or [{"message": "no YAML metadata block"}]
                return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})
            if m := re.fullmatch(r"/api/models/(.+)/preupload/(.+)", path):
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": modes})
            if m := re.fullmatch(r"/api/models/(.+)/commit/(.+)", path):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                }
                hub.commits.append(Commit(m.group(1), header["summary"], files))
                oid = f"{len(hub.commits):040x}"
                return self._reply(
                    200, {"commitUrl": f"{hub.url}/{m.group(1)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                )
            hub.unknown.append(f"{self.command} {path}")
            return self._reply(404, {"error": f"stand-in Hub: no {self.command} {path}"})

        do_GET = do_POST = do_PUT = do_HEAD = _handle

    return Handler


class serve_hub:  # noqa: N801 - used as a context manager, like open()
    """``with serve_hub() as hub:`` a running stand-in Hub at ``hub.url``."""

    def __enter__(self) -> StandInHub:
        self.hub = StandInHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def card_metadata(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def assert_token_only_in_auth_headers(hub: StandInHub, token: str) -> None:
    sent = [r for r in hub.requests if r.headers.get("authorization") == f"Bearer {token}"]
    assert sent, "the token was never sent"
    for r in hub.requests:
        assert token.encode() not in r.body, f"token in the body of {r.method} {r.path}"
        assert not any(token in v for k, v in r.headers.items() if k != "authorization"), r.path


def test_push_to_hub_end_to_end(tmp_path, dataset_root):
    """A user's run: private repo, a checkpoint pushed during training, the output folder at the end."""
    recipe = {
        **DEMOS["openvla"],
        "dataset_root": dataset_root,
        "train_episodes": ["0:5"],
        "eval_episodes": ["5:6"],
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "dataloader_num_workers": 0,
        "push_to_hub": True,
        "hub_model_id": f"{USER}/tiny-openvla",
        "hub_private_repo": True,
        "hub_strategy": "checkpoint",
        "hub_token": WRITE,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home")}
    with serve_hub() as hub:
        run = accelerate_launch(
            "recipes/sft.py", "--config", str(tmp_path / "recipe.yaml"), env={**env, "HF_ENDPOINT": hub.url}
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert not hub.unknown, hub.unknown
    repo = f"{USER}/tiny-openvla"
    assert hub.repos[repo]["visibility"] == "private"

    checkpoint_commits = [c for c in hub.commits if c.message.endswith(", checkpoint")]
    assert checkpoint_commits and checkpoint_commits[0].message == "Training in progress, step 2, checkpoint"
    assert {f"last-checkpoint/{n}" for n in ("optimizer.pt", "model.safetensors", "trainer_state.json")} <= set(
        checkpoint_commits[0].files
    )
    # ... then its completion mark and recipe, in a commit queued after the files: a Hub checkpoint with the mark is
    # whole (the files commit, uploaded from a thread, may or may not have listed the mark already)
    from vla_recipes.checkpointing import COMPLETE_MARK

    marks = [c for c in hub.commits if c.message.startswith("Checkpoint of step")]
    # one per checkpoint transformers pushed (it skips a save while the previous push still runs), in step order
    pushed_steps = [int(c.message.split()[4].rstrip(",")) for c in checkpoint_commits]
    assert [c.message for c in marks] == [f"Checkpoint of step {step} complete" for step in pushed_steps]
    assert set(marks[0].files) == {f"last-checkpoint/{COMPLETE_MARK}", "last-checkpoint/recipe.json"}
    assert json.loads(marks[0].files[f"last-checkpoint/{COMPLETE_MARK}"])["global_step"] == 2
    assert hub.commits.index(marks[0]) > hub.commits.index(checkpoint_commits[0])

    final, out = hub.commits[-1], tmp_path / "out"
    assert (final.repo_id, final.message) == (repo, "End of training")
    local = {
        str(f.relative_to(out)): f.read_bytes()
        for f in out.rglob("*")
        if f.is_file() and not f.relative_to(out).parts[0].startswith(("checkpoint-", "_"))
    }
    assert final.files == local  # exactly the output folder, byte for byte, without local checkpoints
    assert {"model.safetensors", "config.json", "README.md", "recipe.json", "processor_config.json"} <= set(local)
    assert "local/synthetic_reach" in json.loads(final.files["config.json"])["norm_stats"]

    card = final.files["README.md"].decode()
    meta = card_metadata(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "robotics"
    assert meta["datasets"] == ["local/synthetic_reach"] and "openvla" in meta["tags"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["loss"] == json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert "runtime" not in metrics
    assert f'AutoModel.from_pretrained("{repo}")' in card and "predict_action(" in card
    assert "learning_rate: 0.001" in card and "recipe.json" in card

    # The token: in Authorization headers, nowhere else (output, uploads, saved arguments, checkpoints).
    assert_token_only_in_auth_headers(hub, WRITE)
    assert WRITE not in run.stdout + run.stderr
    for commit in hub.commits:
        assert not [name for name, data in commit.files.items() if WRITE.encode() in data], commit.message
    assert not [f for f in out.rglob("*") if f.is_file() and WRITE.encode() in f.read_bytes()]
    assert (out / "training_args.bin").is_file()


def test_lora_card_names_the_base_model(tmp_path):
    """An adapter's card names its base (``base_model``), keeps only real metrics, and says it is an adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from vla_recipes.configs import ModelArguments, VLATrainingArguments
    from vla_recipes.hub import model_card
    from vla_recipes.models.openvla import OpenVLAForActionPrediction

    demo = yaml.safe_load((ROOT / "recipes/demo/openvla.yaml").read_text())
    config = AutoConfig.for_model(**demo["model_config"])
    config.norm_stats, config.norm_mode = {"lerobot/libero_spatial_image": {}}, "bounds_q99"
    config.camera_keys, config.action_horizon, config.action_dim = ["observation.images.image"], 1, 7
    model = OpenVLAForActionPrediction(config)
    model.config._name_or_path = "openvla/openvla-7b"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=model.lora_target_modules()))
    log = [{"loss": 2.0}, {"loss": 1.0}, {"eval_loss": 0.5, "eval_runtime": 3.0, "eval_samples_per_second": 9.0}]
    trainer = SimpleNamespace(
        args=VLATrainingArguments(output_dir=str(tmp_path / "out"), hub_model_id="alice/openvla-libero-lora"),
        model=peft_model,
        state=SimpleNamespace(log_history=log, max_steps=10),
    )
    card = model_card(trainer, ModelArguments(model_name_or_path="openvla/openvla-7b", finetune_mode="lora"))
    meta = card_metadata(card)
    assert meta["base_model"] == "openvla/openvla-7b"
    assert meta["datasets"] == ["lerobot/libero_spatial_image"] and "lora" in meta["tags"]
    assert meta["model-index"][0]["results"][0]["metrics"] == [{"type": "loss", "value": 0.5}]
    assert "LoRA adapter" in card and 'AutoModel.from_pretrained("alice/openvla-libero-lora")' in card


@pytest.fixture
def hub_in_process(monkeypatch, tmp_path):
    """The stand-in Hub for in-process calls, with no token anywhere unless a test sets one."""
    from huggingface_hub import constants

    with serve_hub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        yield hub


def push_args(tmp_path: Path, **overrides):
    from vla_recipes.configs import VLATrainingArguments

    fields = {"output_dir": str(tmp_path / "my-run"), "push_to_hub": True, "hub_model_id": f"{USER}/policy"}
    return VLATrainingArguments(**{**fields, **overrides})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    ("overrides", "setting", "message"),
    [
        ({"hub_model_id": "alice/my policy", "hub_token": WRITE}, None, "hub_model_id='alice/my policy' is not a Hub"),
        ({"hub_model_id": "alice/a/b", "hub_token": WRITE}, None, "hub_model_id='alice/a/b' is not a Hub repo id"),
        ({}, None, "push_to_hub needs a Hub token with write access: run `hf auth login`, set HF_TOKEN"),
        ({"hub_token": "hf_expired"}, None, "the Hub rejected the token (401); create a write token"),
        ({"hub_token": READ}, None, "the token of 'alice' is read-only; create a write token"),
        ({"hub_model_id": "bob/policy", "hub_token": WRITE}, None, "'alice' cannot create repos under 'bob'"),
        ({"hub_token": WRITE}, "offline", "push_to_hub: HF_HUB_OFFLINE is set; unset it"),
        ({"hub_token": WRITE}, "unreachable", "cannot be reached (ConnectError); check the network"),
    ],
)
def test_push_that_cannot_happen_fails_before_training(
    hub_in_process, monkeypatch, tmp_path, overrides, setting, message
):
    from huggingface_hub import constants

    from vla_recipes.configs import RecipeError
    from vla_recipes.hub import check_push_to_hub

    if setting == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if setting == "unreachable":
        monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())
    args = push_args(tmp_path, **overrides)
    with pytest.raises(RecipeError) as error:
        check_push_to_hub(args)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not hub_in_process.repos and not hub_in_process.commits  # nothing was created or pushed


def test_default_repo_id_is_checked_too(hub_in_process, tmp_path):
    from vla_recipes.configs import RecipeError
    from vla_recipes.hub import check_push_to_hub

    args = push_args(tmp_path, hub_model_id=None, output_dir=str(tmp_path / "run..1"), hub_token=WRITE)
    with pytest.raises(RecipeError, match=r"hub_model_id \(unset: the output_dir's name\)='run..1'"):
        check_push_to_hub(args)


def test_a_valid_token_passes_and_leaves_the_saved_arguments(hub_in_process, monkeypatch, tmp_path):
    """A ``hub_token`` moves into this process's HF_TOKEN: training_args.bin and checkpoints never hold it."""
    import os

    from vla_recipes.hub import check_push_to_hub

    args = push_args(tmp_path, hub_token=WRITE)
    monkeypatch.setenv("HF_TOKEN", "")  # restored after the test
    check_push_to_hub(args)
    assert args.hub_token is None and os.environ["HF_TOKEN"] == WRITE
    assert WRITE not in json.dumps(args.to_dict()) and WRITE not in repr(args)

    monkeypatch.setenv("HF_TOKEN", WRITE)  # the usual way: `hf auth login` or HF_TOKEN
    args = push_args(tmp_path, hub_model_id=f"{ORG}/policy")
    check_push_to_hub(args)
    assert_token_only_in_auth_headers(hub_in_process, WRITE)
    check_push_to_hub(push_args(tmp_path, push_to_hub=False, hub_token="anything"))  # not pushing: nothing checked
