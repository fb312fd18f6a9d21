"""The private ``transformers.Trainer`` API vla-recipes still relies on, where no public equivalent exists.

Everything else goes through callbacks and public methods (atomic checkpoints are a ``TrainerCallback``; the final
push waits on the public ``push_in_progress``). What is left is pinned here, so that a transformers upgrade that
changes or drops it fails this test, naming the method and the code to re-check, instead of a training run.
"""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer

# name -> (its parameters, who relies on it and why there is no public way)
PRIVATE_API = {
    "_load_optimizer_and_scheduler": (
        ["self", "checkpoint"],
        "VLATrainer overrides it: a multi-process CPU run must load the optimizer onto plain 'cpu' (no hook exists)",
    ),
    "_prepare_inputs": (
        ["self", "inputs"],
        "VLATrainer.prediction_step moves the eval batch to the device as Trainer.prediction_step does",
    ),
    "save_model": (
        ["self", "output_dir", "_internal_call"],
        "hub.save_for_inference passes _internal_call=True: no push of transformers' draft card before ours",
    ),
}
# The reason for the override of _load_optimizer_and_scheduler: transformers maps the optimizer state to
# args.device in a multi-process run, which is 'cpu:<rank>' on CPU (torch cannot restore to it).
DEVICE_MAP_LOCATION = 'map_location = self.args.device if self.args.world_size > 1 else "cpu"'


@pytest.mark.parametrize("name", sorted(PRIVATE_API))
def test_private_trainer_api_is_as_pinned(name):
    parameters, why = PRIVATE_API[name]
    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers.Trainer.{name} is gone; re-check: {why}"
    found = list(inspect.signature(method).parameters)
    assert found == parameters, f"transformers.Trainer.{name}{found} changed (pinned {parameters}); re-check: {why}"


def test_the_optimizer_map_location_that_needs_the_override_is_still_there():
    assert DEVICE_MAP_LOCATION in inspect.getsource(Trainer._load_optimizer_and_scheduler), (
        "transformers.Trainer._load_optimizer_and_scheduler no longer maps the optimizer to args.device on "
        "multi-process runs: VLATrainer._load_optimizer_and_scheduler may be dropped (re-run test_resume's "
        "multi-process CPU case without it)"
    )


def test_cached_file_still_takes_the_private_missing_entries_switch():
    """``finetuning.load_config`` and ``models/adapters.py`` ask whether a repo has a file without an exception for a
    missing one; ``cached_file``'s switch for that is private (``has_file`` would make a second Hub request)."""
    from transformers.utils import hub

    assert "_raise_exceptions_for_missing_entries" in inspect.signature(hub.cached_files).parameters, (
        "transformers.utils.hub.cached_files (behind cached_file) lost _raise_exceptions_for_missing_entries; "
        "re-check finetuning.load_config and models/adapters.py (adapter_base, AdapterFolderMixin.from_pretrained)"
    )
