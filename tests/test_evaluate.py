"""Evaluation and logging: ``recipes/evaluate.py`` on a tiny trained OpenVLA, the metric modules, and what a
training run logs (eval every ``eval_steps``, samples/s per logging window, TensorBoard)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from cli import ROOT, accelerate_launch, load_script, run

from vla_recipes.evaluation import load_metric

DEMO = yaml.safe_load((ROOT / "recipes/demo/openvla.yaml").read_text())
STEPS, EVAL_STEPS, LOGGING_STEPS, BATCH = 20, 10, 5, 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_root) -> tuple[Path, Path]:
    """The demo OpenVLA trained 20 steps on episodes 0-4 (eval on 5), TensorBoard on: (output folder, recipe)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    recipe = {
        **DEMO,
        "dataset_root": dataset_root,
        "train_episodes": ["0:5"],
        "eval_episodes": ["5:6"],
        "output_dir": str(tmp / "out"),
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "logging_steps": LOGGING_STEPS,
        "eval_steps": EVAL_STEPS,
        "warmup_steps": 2,
        "dataloader_num_workers": 0,
        "report_to": "tensorboard",
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = accelerate_launch("recipes/sft.py", "--config", str(path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out", path


def evaluate(model: Path, recipe: Path, *extra: str):
    command = [sys.executable, str(ROOT / "recipes/evaluate.py"), "--model", str(model), "--config", str(recipe)]
    return run([*command, "--num_workers", "0", "--batch_size", "8", *extra], timeout=300)


@pytest.fixture(scope="module")
def evaluated(trained) -> Path:
    """``recipes/evaluate.py`` run twice on the trained folder: as a user runs it, then again in this process (to
    save a start-up) where it must replace its results, not add to them."""
    out, recipe = trained
    result = evaluate(out, recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "action-token accuracy" in result.stdout
    load_script("evaluate").main(
        ["--model", str(out), "--config", str(recipe), "--num_workers", "0", "--plot_episodes", "1"]
    )
    return out


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_eval_results_hold_open_loop_metrics_equal_to_a_reference(evaluated, dataset_root):
    from transformers import AutoModel, AutoProcessor

    from vla_recipes.configs import DataArguments
    from vla_recipes.data.lerobot import VLADataset, load_metadata
    from vla_recipes.evaluation import action_token_ids

    results = json.loads((evaluated / "eval_results.json").read_text())
    assert "eval_loss" in results and "eval_action_accuracy" in results  # the trainer's keys are kept
    assert results["open_loop_episodes"] == [5] and results["open_loop_num_frames"] == 16
    assert len(results["open_loop_l1_per_dim"]) == len(results["open_loop_mse_per_dim"]) == 7
    assert len(results["open_loop_l1_per_step"]) == 1  # OpenVLA: chunks of one action
    assert results["open_loop_l1"] == pytest.approx(np.mean(results["open_loop_l1_per_dim"]))
    assert 0 <= results["open_loop_action_token_accuracy"] <= 1
    assert results["open_loop_baseline_mean_action_l1"] > 0

    # The same numbers from the model a user reloads, computed here by hand.
    model, processor = AutoModel.from_pretrained(evaluated).eval(), AutoProcessor.from_pretrained(evaluated)
    data_args = DataArguments(dataset_repo_id="local/synthetic_reach", dataset_root=dataset_root)
    dataset = VLADataset(load_metadata(data_args), data_args, ["observation.images.image"], [5])
    samples = [dataset[i] for i in range(len(dataset))]
    inputs = processor(images=[s["images"][0] for s in samples], text=[s["task"] for s in samples])
    with torch.no_grad():
        predicted = model.predict_action(**inputs).numpy()
        generated = model.generate_action_ids(**inputs).numpy()
    target = torch.stack([s["actions"] for s in samples]).numpy()
    np.testing.assert_allclose(results["open_loop_l1_per_dim"], np.abs(predicted - target).mean((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(results["open_loop_mse"], ((predicted - target) ** 2).mean(), rtol=1e-5)
    accuracy = (generated == action_token_ids(model, processor, target).reshape(16, 7)).mean()
    assert results["open_loop_action_token_accuracy"] == pytest.approx(accuracy)


def test_plots_and_model_card(evaluated):
    from huggingface_hub import ModelCard

    assert (evaluated / "plots/episode_5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((evaluated / "eval_results.json").read_text())
    card = ModelCard.load(evaluated / "README.md")
    metrics = [(r.metric_type, r.metric_value) for r in card.data.eval_results]
    assert metrics.count(("open_loop_l1", results["open_loop_l1"])) == 1  # two runs: replaced, not duplicated
    assert [name for name, _ in metrics].count("open_loop_l1") == 1
    assert "loss" in dict(metrics)  # the trainer's eval metrics stay
    assert card.text.count("## Open-loop evaluation") == 1
    assert card.data.pipeline_tag == "robotics"


def test_bad_episodes_fail_in_one_line(trained):
    out, recipe = trained
    result = evaluate(out, recipe, "--episodes", "4:8")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --episodes: episodes [6, 7] do not exist; the dataset has episodes 0..5"
    )
    assert "Traceback" not in result.stderr


def test_action_error_metric_on_known_numbers_with_padding():
    metric = load_metric("action_error")
    predictions = [[[1.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [5.0, 5.0]]]
    references = [[[0.0, 0.0], [2.0, 2.0]], [[0.0, 4.0], [9.0, 9.0]]]
    is_pad = [[False, False], [False, True]]  # the last step of sample 2 lies past its episode's end
    result = metric.compute(predictions=predictions, references=references, action_is_pad=is_pad)
    assert result["l1_per_dim"] == pytest.approx([1.0, 8 / 3])  # |1|+|2|+|0| / 3, |2|+|2|+|4| / 3
    assert result["mse_per_dim"] == pytest.approx([5 / 3, 24 / 3])
    assert result["l1"] == pytest.approx((1 + 8 / 3) / 2)
    assert result["l1_per_step"] == pytest.approx([7 / 4, 2.0])
    assert result["num_steps"] == 3

    for predictions, references in (([[[0.5]]], [[[0.0]]]), ([[[0.0]], [[2.0]]], [[[0.0]], [[0.0]]])):
        metric.add_batch(predictions=predictions, references=references, action_is_pad=[[False]] * len(predictions))
    assert metric.compute()["l1"] == pytest.approx(2.5 / 3)  # batches accumulate


def test_action_token_accuracy_metric_on_known_numbers_with_padding():
    metric = load_metric("action_token_accuracy")
    result = metric.compute(
        predictions=np.array([[[5, 6], [7, 7]], [[1, 2], [3, 4]]]),
        references=np.array([[[5, 7], [7, 7]], [[1, 2], [0, 0]]]),
        action_is_pad=np.array([[False, False], [False, True]]),
    )
    assert result["accuracy_per_dim"] == pytest.approx([1.0, 2 / 3])
    assert result["accuracy"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="every step is padded"):
        metric.compute(predictions=[[[1]]], references=[[[1]]], action_is_pad=[[True]])


def test_eval_runs_at_exactly_the_eval_steps(trained):
    out, _ = trained
    logs = history(out)
    end = next(i for i, e in enumerate(logs) if "train_runtime" in e)  # the summary; a final evaluate() may follow
    during_training = [e["step"] for e in logs[:end] if "eval_loss" in e]
    assert during_training == list(range(EVAL_STEPS, STEPS + 1, EVAL_STEPS))
    assert all("eval_action_accuracy" in e for e in history(out) if "eval_loss" in e)


def test_one_samples_per_second_per_logging_window(trained):
    out, _ = trained
    train_logs = [e for e in history(out) if "loss" in e]
    assert [e["step"] for e in train_logs] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    assert all(e["samples_per_second"] > 0 for e in train_logs)
    assert sum("samples_per_second" in e for e in history(out)) == len(train_logs)  # none in eval logs
    assert not any("gpu_mem_peak_gb" in e for e in history(out))  # CPU run


def test_tensorboard_holds_train_and_eval_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    tags = set()
    for events in (out / "runs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/samples_per_second", "train/action_accuracy", "eval/loss"} <= tags


def test_throughput_window_after_a_resume(monkeypatch):
    """Resumed at step 100: the first window counts only the steps this run took, evaluation time left out."""
    from vla_recipes.trainers import base

    clock = iter([1000.0, 1012.0, 1022.0])
    monkeypatch.setattr(base.time, "perf_counter", lambda: next(clock))
    args = SimpleNamespace(train_batch_size=4, gradient_accumulation_steps=2, world_size=3, device=torch.device("cpu"))
    throughput = base._Throughput()
    throughput.on_step_begin(args, SimpleNamespace(global_step=100), None)  # t = 1000
    throughput.on_step_begin(args, SimpleNamespace(global_step=101), None)  # the window is already open
    throughput.on_evaluate(args, None, None, metrics={"eval_runtime": 2.0})
    logs = throughput.window(args, SimpleNamespace(global_step=110))  # t = 1012: 10 steps x 24 samples in 10 s
    assert logs == {"samples_per_second": 24.0}
    assert throughput.window(args, SimpleNamespace(global_step=115)) == {"samples_per_second": 12.0}


def test_floating_point_ops_counts_parameters_once():
    from vla_recipes.trainers.base import VLATrainer

    calls = []
    model = SimpleNamespace(main_input_name="input_ids", num_parameters=lambda **kw: calls.append(kw) or 1000)
    trainer = SimpleNamespace(model=model, _flop_parameters=None)
    inputs = {"input_ids": torch.zeros(2, 5)}
    assert [VLATrainer.floating_point_ops(trainer, inputs) for _ in range(3)] == [6 * 10 * 1000] * 3
    assert calls == [{"exclude_embeddings": True}]
    assert VLATrainer.floating_point_ops(trainer, {"pixel_values": torch.zeros(1)}) == 0


def test_pi05_open_loop_scores_whole_chunks(two_camera_root, tmp_path):
    """pi0.5 (random tiny, no training): chunks of 10 scored per step, padded steps left out, no token accuracy."""
    from vla_recipes.configs import DataArguments, ModelArguments
    from vla_recipes.data.lerobot import VLADataset, dataset_norm_stats, load_metadata
    from vla_recipes.evaluation import open_loop_metrics, plot_episodes, predict_open_loop
    from vla_recipes.families import get_family
    from vla_recipes.finetuning import load_config, load_model

    demo = yaml.safe_load((ROOT / "recipes/demo/pi05.yaml").read_text())
    cameras = demo["camera_keys"]
    data_args = DataArguments(
        dataset_repo_id="local/synthetic_reach", dataset_root=two_camera_root, action_horizon=10, camera_keys=cameras
    )
    meta = load_metadata(data_args)
    model_args = ModelArguments(model_config=demo["model_config"])
    family, config = get_family("pi05"), load_config(model_args)
    stats = dataset_norm_stats(meta, data_args, "quantiles", None)
    family.configure(
        config, data_args, cameras, action_dim=7, state_dim=8, norm_mode="quantiles", norm_stats=stats
    )  # fmt: skip
    torch.manual_seed(0)
    model = load_model(model_args, config, family.model_class, str(tmp_path)).eval()
    processor = family.build_processor(model.config, model_args)

    predictions = predict_open_loop(model, processor, VLADataset(meta, data_args, cameras, [3]), batch_size=8)
    assert predictions.predicted.shape == predictions.target.shape == (16, 10, 7)
    assert predictions.is_pad[-1].sum() == 9 and predictions.predicted_ids is None  # the last frame: 1 real step
    results = open_loop_metrics(model, processor, predictions)
    assert "action_token_accuracy" not in results and len(results["l1_per_step"]) == 10
    real = ~predictions.is_pad
    error = np.abs(predictions.predicted - predictions.target)[real]
    assert results["l1"] == pytest.approx(error.mean(), rel=1e-6)
    assert results["l1_per_step"][9] == pytest.approx(np.abs(predictions.predicted - predictions.target)[:7, 9].mean())
    (plot,) = plot_episodes(predictions, tmp_path / "plots", [3], [0, 6])
    assert plot.name == "episode_3.png" and plot.read_bytes()[:4] == b"\x89PNG"


def test_wilson_interval_matches_the_closed_form():
    from vla_recipes.evaluation import wilson_interval

    assert wilson_interval(10, 50) == pytest.approx((0.1124, 0.3304), abs=1e-4)  # textbook value for 10/50
    low, high = wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.0713, abs=1e-4)  # not empty at 0 successes
    assert wilson_interval(50, 50)[1] == 1.0
    with pytest.raises(ValueError, match="at least one episode"):
        wilson_interval(0, 0)
