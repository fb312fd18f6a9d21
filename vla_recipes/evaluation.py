"""How good is a fine-tuned policy: open loop on held-out episodes, closed loop in a LeRobot gym env.

- **Open loop** (:func:`evaluate_open_loop`, ``recipes/evaluate.py``): every frame of some recorded episodes goes
  through the batched ``predict_action`` a user calls; the predicted chunks are compared with the recorded actions
  in the dataset's units with the local ``evaluate`` metric modules of :mod:`vla_recipes.metrics` (L1 / MSE per
  dimension and per chunk step, OpenVLA's action-token accuracy), and a few episodes are plotted.
- **Closed loop** (:mod:`vla_recipes.closed_loop`, ``recipes/rollout.py``): :class:`ChunkedPolicy` makes the model
  a LeRobot policy, so LeRobot's own ``eval_policy`` loop runs it in environments built by ``lerobot.envs`` (success
  rate, rewards, videos).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.collators import observations
from vla_recipes.data.lerobot import VLADataset, check_episodes, load_metadata
from vla_recipes.data.normalize import normalize, select_stats
from vla_recipes.data.state_selection import feature_dim
from vla_recipes.families import get_family
from vla_recipes.hub import add_card_results
from vla_recipes.metrics import METRICS

logger = logging.getLogger(__name__)

OPEN_LOOP_TASK = "open-loop action prediction"
CLOSED_LOOP_TASK = "closed-loop rollout"
OPEN_LOOP_PREFIX = "open_loop_"  # the keys of eval_results.json an open-loop evaluation writes


@dataclass
class OpenLoopPredictions:
    """Predicted and recorded action chunks of every evaluated frame, in the dataset's units."""

    predicted: np.ndarray  # (frames, horizon, action_dim)
    target: np.ndarray  # (frames, horizon, action_dim)
    is_pad: np.ndarray  # (frames, horizon): chunk steps past the episode's end (no recorded action)
    episode_index: np.ndarray  # (frames,)
    predicted_ids: np.ndarray | None = None  # OpenVLA: the generated action tokens, (frames, horizon, action_dim)


def default_output_dir(model: str) -> Path:
    """Where an evaluation writes: the model's own folder, or ``outputs/eval/<name>`` for a Hub id."""
    return Path(model) if Path(model).is_dir() else Path("outputs/eval") / Path(model).name


def update_eval_results(folder: Path, prefix: str, results: dict) -> Path:
    """Merge ``results`` as ``<prefix><key>`` into ``folder/eval_results.json``, replacing that prefix's earlier keys
    (a re-run replaces its results; the trainer's ``eval_*`` and the other evaluation's keys stay)."""
    path = Path(folder) / "eval_results.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    kept = {k: v for k, v in previous.items() if not k.startswith(prefix)}
    path.write_text(json.dumps(kept | {prefix + k: v for k, v in results.items()}, indent=2))
    return path


def _on_device(inputs, device: torch.device):
    return inputs.to(device) if hasattr(inputs, "to") else {k: v.to(device) for k, v in inputs.items()}


def saved_config(model: str):
    """A saved model's config (cheap: no weights), or one line when ``model`` is neither a folder here nor a model
    the Hub gives."""
    from transformers import AutoConfig

    if Path(model).exists() and not Path(model).is_dir():
        raise RecipeError(f"--model {model!r} is a file; give the output folder of a run (or a Hub id)")
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: no such repo, or no network"
        raise RecipeError(
            f"--model {model!r} is not a folder here, and not a model the Hub gives ({why}); give a run's output "
            "folder or a Hub model id"
        ) from None


def check_model_fits_dataset(config, meta, data_args: DataArguments) -> None:
    """The model's cameras, action and state dims must be the dataset's: otherwise every frame would be predicted
    before the comparison fails (or, for the state, the model would read other dims than it was trained on)."""
    missing = [k for k in config.camera_keys if k not in meta.camera_keys]
    if missing:
        cameras = meta.camera_keys
        raise RecipeError(f"the model's camera_keys {missing} are not cameras of the dataset; it has {cameras}")
    action_dim = feature_dim(meta, data_args.action_key)
    if action_dim != config.action_dim:
        raise RecipeError(
            f"the dataset's {data_args.action_key!r} has {action_dim} dims but the model predicts {config.action_dim}: "
            "evaluate on the dataset the model was trained on (or one with its action space), or set action_key"
        )
    state_dim, key = getattr(config, "state_dim", None), data_args.state_key
    if state_dim is not None and key is not None:
        have, indices = feature_dim(meta, key), getattr(config, "state_indices", None)
        if not (max(indices) < have if indices else have == state_dim):
            raise RecipeError(
                f"the dataset's {key!r} has {have} dims, not the state the model was trained on ({state_dim} dims"
                f"{f', indices up to {max(indices)}' if indices else ''}): evaluate on a dataset with the model's "
                "state, or set state_key"
            )


@dataclass
class OpenLoopReport:
    """An open-loop evaluation's metrics (:func:`open_loop_metrics`), the files it wrote and the model's config."""

    results: dict
    results_path: Path
    plots: list[Path]
    config: object


def evaluate_open_loop(
    model: str,
    data_args: DataArguments,
    episodes: list[int],
    output_dir: str | Path | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    plot_episodes_count: int = 3,
    plot_dims: int = 8,
    device: str = "cpu",
    episodes_key: str = "episodes",
) -> OpenLoopReport:
    """Evaluate a saved model (folder or Hub id) open loop on ``episodes`` of ``data_args``' dataset.

    Checked before any weight loads: the model exists, the episodes exist, its cameras / action / state fit the
    dataset (``episodes_key`` names the episodes in the error). Whole predicted chunks are compared, with the
    state dims the model was trained on. Writes ``open_loop_*`` keys into ``<output_dir>/eval_results.json``
    (default: the model's folder, or ``outputs/eval/<name>``), plots and the model card's results.
    """
    from transformers import AutoModel, AutoProcessor

    if not episodes:
        raise RecipeError("no episodes to evaluate: pass --episodes (e.g. 40:50) or set eval_episodes in the recipe")
    config = saved_config(model)
    meta = load_metadata(data_args)
    check_episodes(meta, episodes_key, episodes)
    check_model_fits_dataset(config, meta, data_args)
    out = Path(output_dir) if output_dir else default_output_dir(model)

    policy = AutoModel.from_pretrained(model, config=config).to(device).eval()
    processor = AutoProcessor.from_pretrained(model)
    sample_args = dataclasses.replace(  # the chunk the model predicts, the state dims it saw
        data_args,
        action_horizon=policy.config.action_horizon,
        state_indices=getattr(policy.config, "state_indices", data_args.state_indices),
    )
    frame_resize = get_family(policy.config.model_type).frame_resize_for(policy.config)
    dataset = VLADataset(meta, sample_args, list(policy.config.camera_keys), episodes, frame_resize=frame_resize)
    predictions = predict_open_loop(policy, processor, dataset, batch_size, num_workers)
    results = open_loop_metrics(policy, processor, predictions)
    dims = list(range(min(plot_dims, predictions.predicted.shape[-1])))
    plots = plot_episodes(predictions, out / "plots", results["episodes"][:plot_episodes_count], dims)
    path = update_eval_results(out, OPEN_LOOP_PREFIX, results)
    scalars = {OPEN_LOOP_PREFIX + k: v for k, v in results.items() if isinstance(v, float)}
    add_card_results(
        out, scalars, task=OPEN_LOOP_TASK, dataset=data_args.dataset_repo_id, section="Open-loop evaluation"
    )
    return OpenLoopReport(results, path, plots, policy.config)


@torch.no_grad()
def predict_open_loop(model, processor, dataset, batch_size: int = 16, num_workers: int = 0) -> OpenLoopPredictions:
    """Run ``predict_action`` on every sample of a ``VLADataset`` (no shuffling: rows stay in episode order).

    For OpenVLA it runs as its two halves, ``generate_action_ids`` then ``actions_from_ids``, to keep the tokens.
    """
    family = get_family(model.config.model_type)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    predicted, target, is_pad, predicted_ids = [], [], [], []
    for samples in loader:
        inputs = _on_device(processor(**observations(samples)), model.device)
        if family.decodes_action_tokens:
            ids = model.generate_action_ids(**inputs)
            actions = model.actions_from_ids(ids)
            predicted_ids.append(ids.reshape(actions.shape).cpu().numpy())
        else:
            actions = model.predict_action(**inputs)
        predicted.append(actions.float().cpu().numpy())
        target.append(torch.stack([s["actions"] for s in samples]).float().numpy())
        is_pad.append(torch.stack([s["action_is_pad"] for s in samples]).numpy())
    return OpenLoopPredictions(
        predicted=np.concatenate(predicted),
        target=np.concatenate(target),
        is_pad=np.concatenate(is_pad),
        episode_index=np.asarray(dataset.dataset.hf_dataset.with_format(None)["episode_index"]),
        predicted_ids=np.concatenate(predicted_ids) if predicted_ids else None,
    )


def action_token_ids(model, processor, actions: np.ndarray) -> np.ndarray:
    """OpenVLA's token ids of actions in dataset units: normalised and binned exactly as its training labels."""
    from vla_recipes.models.openvla import ActionTokenizer

    stats = select_stats(model.config.norm_stats, getattr(model.config, "default_unnorm_key", None))["action"]
    tokenizer = ActionTokenizer(processor.tokenizer, bins=model.config.n_action_bins)
    return tokenizer.encode(normalize(np.asarray(actions, dtype=np.float64), stats, model.config.norm_mode))


def load_metric(name: str):
    """A metric module of :mod:`vla_recipes.metrics`, loaded from its file (no Hub, no network)."""
    import evaluate

    return evaluate.load(str(METRICS / f"{name}.py"), keep_in_memory=True)


def open_loop_metrics(model, processor, predictions: OpenLoopPredictions) -> dict:
    """L1 / MSE (per dim, per chunk step, mean), the mean-action baseline and, for OpenVLA, token accuracy."""
    p = predictions
    error = load_metric("action_error").compute(predictions=p.predicted, references=p.target, action_is_pad=p.is_pad)
    results = {
        "episodes": sorted({int(e) for e in p.episode_index}),
        "num_frames": len(p.predicted),
        **{k: error[k] for k in ("l1", "mse", "l1_per_dim", "mse_per_dim", "l1_per_step", "mse_per_step")},
    }
    stats = select_stats(model.config.norm_stats, getattr(model.config, "default_unnorm_key", None))["action"]
    relative = getattr(model.config, "relative_action_mask", None) is not None  # its mean is of relative actions
    if "mean" in stats and not relative:  # the reference a policy must beat: always predicting the mean action
        real = p.target[~p.is_pad]
        results["baseline_mean_action_l1"] = float(np.abs(real - np.asarray(stats["mean"])).mean())
    if p.predicted_ids is not None:
        accuracy = load_metric("action_token_accuracy").compute(
            predictions=p.predicted_ids,
            references=action_token_ids(model, processor, p.target),
            action_is_pad=p.is_pad,
        )
        results["action_token_accuracy"] = accuracy["accuracy"]
        results["action_token_accuracy_per_dim"] = accuracy["accuracy_per_dim"]
    return results


def plot_episodes(
    predictions: OpenLoopPredictions, out_dir: str | Path, episodes: list[int], dims: list[int]
) -> list[Path]:
    """One PNG per episode, ``episode_<i>.png``: per action dimension, the recorded action at each frame and the
    first predicted step; with chunks (horizon > 1), every ``horizon``-th predicted chunk is drawn in full."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for episode in episodes:
        rows = np.flatnonzero(predictions.episode_index == episode)
        predicted, target = predictions.predicted[rows], predictions.target[rows]
        horizon = predicted.shape[1]
        cols = min(len(dims), 4)
        fig = Figure(figsize=(4 * cols, 2.6 * -(-len(dims) // cols)), layout="constrained")
        axes = np.atleast_1d(fig.subplots(-(-len(dims) // cols), cols, squeeze=False)).ravel()
        for ax, dim in zip(axes, dims, strict=False):
            ax.plot(target[:, 0, dim], color="black", label="recorded")
            ax.plot(predicted[:, 0, dim], color="tab:orange", label="predicted (step 0)")
            if horizon > 1:
                for t in range(0, len(rows), horizon):
                    steps = min(horizon, len(rows) - t)  # not past the episode's end
                    ax.plot(range(t, t + steps), predicted[t, :steps, dim], color="tab:blue", alpha=0.4, lw=0.8)
            ax.set_title(f"action[{dim}]")
            ax.set_xlabel("frame")
        for ax in axes[len(dims) :]:
            ax.set_visible(False)
        axes[0].legend(fontsize="small")
        fig.suptitle(f"episode {episode}: predicted vs recorded actions")
        path = out_dir / f"episode_{episode}.png"
        fig.savefig(path, dpi=80)
        paths.append(path)
    return paths


class ChunkedPolicy(torch.nn.Module):
    """A saved VLA as the LeRobot policy ``eval_policy`` drives: it predicts a chunk of ``action_horizon`` actions,
    hands them out one per env step, and re-plans from the current observation when ``n_action_steps`` are spent.

    It is registered as a virtual subclass of LeRobot's ``PreTrainedPolicy`` (the only check ``eval_policy``
    makes), so LeRobot's own loop runs it. Observations arrive as LeRobot's ``preprocess_observation`` makes them
    (images float CHW in [0, 1], as ``VLADataset`` samples), batched over the vector env.
    """

    def __init__(
        self,
        model,
        processor,
        camera_map: dict[str, str],
        *,
        n_action_steps: int | None = None,
        state_key: str = "observation.state",
        task: str | None = None,
    ) -> None:
        super().__init__()
        self.model, self.processor = model, processor
        self.camera_map = camera_map  # model camera key -> observation key
        self.n_action_steps = n_action_steps or model.config.action_horizon
        if not 1 <= self.n_action_steps <= model.config.action_horizon:
            raise ValueError(f"n_action_steps must be in 1..{model.config.action_horizon} (the model's chunk length)")
        self.needs_state = getattr(model.config, "state_dim", None) is not None  # pi0.5 / pi0 prompt on the state
        self.state_indices = getattr(model.config, "state_indices", None)  # the dims the model was trained on
        self.state_key, self.task = state_key, task
        self._queue: deque[torch.Tensor] = deque()

    def reset(self) -> None:
        self._queue.clear()

    def _state(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., self.state_indices] if self.state_indices is not None else state

    @torch.no_grad()
    def predict_action_chunk(self, observation: dict) -> torch.Tensor:
        """(batch, action_horizon, action_dim) in the dataset's units."""
        batch = len(next(iter(observation[k] for k in self.camera_map.values())))
        tasks = [self.task] * batch if self.task is not None else list(observation.get("task", [""] * batch))
        if not all(tasks):  # PushT and other envs without language: the model still needs its training prompt
            raise RecipeError("the env gives no task instruction: pass the one the model was trained on, --instruction")
        samples = [
            {
                "images": [observation[key][i] for key in self.camera_map.values()],
                "state": self._state(observation[self.state_key][i]) if self.needs_state else None,
                "task": tasks[i],
            }
            for i in range(batch)
        ]
        return self.predict_samples(samples)

    def predict_samples(self, samples: list[dict]) -> torch.Tensor:
        """The model's batched call on samples ``{"images": [one per camera_map entry], "state", "task"}``."""
        inputs = _on_device(self.processor(**observations(samples)), self.model.device)
        return self.model.predict_action(**inputs).float().cpu()

    @torch.no_grad()
    def select_action(self, observation: dict) -> torch.Tensor:
        """The next (batch, action_dim) action; a new chunk is predicted when the queue is empty."""
        if not self._queue:
            chunk = self.predict_action_chunk(observation)
            self._queue.extend(chunk[:, : self.n_action_steps].transpose(0, 1))
        return self._queue.popleft()


def evaluate_closed_loop(
    policy: torch.nn.Module,
    envs: dict,
    env_processors: tuple,
    n_episodes: int,
    *,
    videos_dir: str | Path | None = None,
    max_episodes_rendered: int = 0,
    start_seed: int | None = 0,
) -> dict:
    """LeRobot's ``eval_policy_all`` over ``{suite: {task_id: VectorEnv}}`` (as ``lerobot.envs.make_env`` returns):
    ``{"per_task", "per_group", "overall"}`` with ``pc_success``, rewards and video paths. Closes the envs.
    ``policy``: a :class:`ChunkedPolicy`, or any module with LeRobot's ``select_action`` / ``reset``."""
    from lerobot.policies import PreTrainedPolicy
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
    from lerobot.scripts.lerobot_eval import eval_policy_all

    PreTrainedPolicy.register(type(policy))
    # The model's processor already normalises and tokenises: LeRobot's policy pipelines stay empty.
    preprocessor = PolicyProcessorPipeline(steps=[])
    postprocessor = PolicyProcessorPipeline(
        steps=[], to_transition=policy_action_to_transition, to_output=transition_to_policy_action
    )
    env_preprocessor, env_postprocessor = env_processors
    return eval_policy_all(
        envs,
        policy,
        env_preprocessor,
        env_postprocessor,
        preprocessor,
        postprocessor,
        n_episodes,
        max_episodes_rendered=max_episodes_rendered,
        videos_dir=Path(videos_dir) if videos_dir is not None else None,
        start_seed=start_seed,
    )


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (``z`` = 1.96) Wilson score interval of a success rate: unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 or n successes, where small closed-loop evaluations often land."""
    if n <= 0:
        raise ValueError(f"a success rate needs at least one episode, got n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
