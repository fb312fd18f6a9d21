"""VLADataCollator on OpenVLA: the reference's token sequence, labels only on action tokens + EOS, right padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_recipes.data.collators import VLADataCollator
from vla_recipes.data.normalize import Normalizer, normalize
from vla_recipes.models.char_tokenizer import build_llama_like_tokenizer
from vla_recipes.models.openvla import ActionTokenizer, OpenVLAImageProcessor, OpenVLAProcessor, build_prompt
from vla_recipes.models.openvla.processing_openvla import IGNORE_INDEX

STATS = {
    "q01": [-1.0, -0.5, 0.0],
    "q99": [1.0, 0.5, 2.0],
    "min": [-2.0, -1.0, 0.0],
    "max": [2.0, 1.0, 2.0],
    "mask": [True, True, False],
}


@pytest.fixture(scope="module")
def collator() -> VLADataCollator:
    tokenizer = build_llama_like_tokenizer()
    processor = OpenVLAProcessor(image_processor=OpenVLAImageProcessor(image_size=28), tokenizer=tokenizer)
    processor.normalizer = Normalizer("bounds_q99", {"dataset": {"action": STATS}})
    return VLADataCollator(processor)


@pytest.fixture(scope="module")
def action_tokenizer(collator) -> ActionTokenizer:
    return ActionTokenizer(collator.processor.tokenizer)


def sample(task: str, actions: list[list[float]], is_pad: list[bool] | None = None) -> dict:
    actions_t = torch.tensor(actions)
    return {
        "images": [torch.rand(3, 32, 32)],
        "state": torch.zeros(8),
        "actions": actions_t,
        "action_is_pad": torch.tensor(is_pad or [False] * len(actions)),
        "task": task,
    }


def reference_sequence(
    collator: VLADataCollator, action_tokenizer: ActionTokenizer, task: str, action: np.ndarray
) -> tuple[list[int], list[int]]:
    """OpenVLA's RLDSBatchTransform: tokenise prompt + action string + '</s>', mask all but the last D+1."""
    tokenizer = collator.processor.tokenizer
    normalized = normalize(action, STATS, "bounds_q99")
    ids = tokenizer(build_prompt(task) + action_tokenizer(normalized) + "</s>", add_special_tokens=True).input_ids
    labels = list(ids)
    labels[: -(len(action) + 1)] = [IGNORE_INDEX] * (len(ids) - len(action) - 1)
    return ids, labels


def test_matches_reference_tokenization_and_masking(collator, action_tokenizer):
    actions = [[[0.3, -0.2, 1.0]], [[-1.5, 0.49, 0.0]]]
    tasks = ["Pick up the bowl", "open the top drawer of the cabinet"]
    batch = collator([sample(t, a) for t, a in zip(tasks, actions, strict=True)])
    assert batch["pixel_values"].shape == (2, 6, 28, 28)
    for row, (task, action) in enumerate(zip(tasks, actions, strict=True)):
        ids, labels = reference_sequence(collator, action_tokenizer, task, np.array(action[0]))
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["labels"][row, :n].tolist() == labels
        assert batch["attention_mask"][row, :n].all()
        # right padding: pad id, no attention, no loss
        assert (batch["input_ids"][row, n:] == collator.processor.tokenizer.pad_token_id).all()
        assert not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    # exactly D action tokens + EOS carry a label per sample
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [4, 4]


def test_gripper_is_not_normalised_and_ids_are_action_tokens(collator, action_tokenizer):
    batch = collator([sample("go", [[0.0, 0.0, 1.0]])])
    action_ids = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX][:-1]
    begin = action_tokenizer.action_token_begin_idx
    assert (action_ids > begin).all()
    decoded = action_tokenizer.decode_token_ids_to_actions(action_ids.numpy())
    assert decoded[2] == pytest.approx(1.0, abs=1 / 255)  # the raw gripper value, as OpenVLA's mask leaves it
    assert decoded[0] == pytest.approx(0.0, abs=1 / 255)  # the middle of [q01, q99] -> 0


def test_chunk_steps_padded_past_the_episode_carry_no_loss(collator, action_tokenizer):
    batch = collator([sample("go", [[0.1, 0.1, 0.0], [0.2, 0.2, 1.0], [0.2, 0.2, 1.0]], [False, False, True])])
    labelled = batch["labels"][0] != IGNORE_INDEX
    assert labelled.sum() == 2 * 3 + 1  # two real steps of 3 dims + EOS
    # the padded step is still in the input sequence (teacher forcing stays aligned)
    assert (batch["input_ids"][0] > action_tokenizer.action_token_begin_idx).sum() == 9


def test_a_mixture_batch_normalises_each_sample_with_its_dataset_statistics():
    """OpenVLA-OFT on a `datasets:` mixture: actions and state of each sample use their own dataset's statistics
    (the collator once took one dataset's for every sample, and a mixture failed), as each dataset alone would."""
    from vla_recipes.models.openvla_oft import OpenVLAOFTProcessor

    def bounds(low: float, high: float, dim: int) -> dict:
        return {"q01": [low] * dim, "q99": [high] * dim, "min": [low] * dim, "max": [high] * dim}

    norm_stats = {
        name: {"action": bounds(low, high, 3), "proprio": bounds(low, high, 2)}
        for name, (low, high) in {"near": (-1.0, 1.0), "far": (0.0, 10.0)}.items()
    }
    processor = OpenVLAOFTProcessor(OpenVLAImageProcessor(image_size=28), build_llama_like_tokenizer())
    processor.normalizer = Normalizer("bounds_q99", norm_stats, default_unnorm_key="far")
    samples = [sample("go", [[0.5, 0.5, 0.5]]) | {"state": torch.full((2,), 0.5), "dataset": d} for d in norm_stats]
    batch = VLADataCollator(processor)(samples)
    for row, name in enumerate(norm_stats):
        alone = VLADataCollator(processor)([samples[row]])
        assert torch.equal(batch["actions"][row], alone["actions"][0])
        assert torch.equal(batch["state"][row], alone["state"][0])
        expected = normalize(np.full(3, 0.5), norm_stats[name]["action"], "bounds_q99")
        np.testing.assert_allclose(batch["actions"][row, 0].numpy(), expected, rtol=1e-6)
    assert not torch.equal(batch["actions"][0], batch["actions"][1])
