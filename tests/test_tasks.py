"""``tasks``: train and evaluate on the episodes of chosen tasks (exact strings or ``re:`` patterns)."""

from __future__ import annotations

import pytest

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.lerobot import episode_split, load_metadata

TASKS = ("turning on the radio", "putting the cup in the sink", "turning off the lamp")  # episode e: TASKS[e % 3]


@pytest.fixture(scope="module")
def multitask_root(tmp_path_factory) -> str:
    from vla_recipes.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "multitask"
    make_synthetic_dataset(root, num_episodes=9, episode_length=4, image_size=64, tasks=TASKS)
    return str(root)


def split(root: str, **kw) -> tuple[list[int], list[int] | None]:
    args = DataArguments(dataset_repo_id="local/multitask", dataset_root=root, **kw)
    return episode_split(load_metadata(args), args)


@pytest.mark.parametrize(
    ("overrides", "train", "evaluate"),
    [
        ({"tasks": ["turning on the radio"]}, [0, 3, 6], None),
        ({"tasks": ["turning on the radio", "turning off the lamp"]}, [0, 2, 3, 5, 6, 8], None),
        ({"tasks": ["re:turning .*"], "eval_episodes": ["6:9"]}, [0, 2, 3, 5], [6, 8]),
        ({"tasks": ["re:.*cup.*"], "train_episodes": ["0:5"], "eval_episodes": ["5:9"]}, [1, 4], [7]),
        ({"tasks": ["turning on the radio"], "eval_episodes": ["7:9"]}, [0, 3, 6], None),  # no eval episode left
    ],
)
def test_tasks_select_exactly_the_matching_episodes(multitask_root, overrides, train, evaluate):
    assert split(multitask_root, **overrides) == (train, evaluate)


def test_all_episodes_without_tasks(multitask_root):
    assert split(multitask_root) == (list(range(9)), None)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (["turning on the radi"], "tasks: 'turning on the radi' matches no task of the dataset; it has 3 tasks: "),
        (["re:radio"], "tasks: 're:radio' matches no task"),  # a pattern matches the whole task
        (["re:("], "tasks: 're:(' is not a valid regular expression"),
    ],
)
def test_a_task_that_matches_nothing_lists_the_tasks(multitask_root, tasks, message):
    with pytest.raises(RecipeError) as error:
        split(multitask_root, tasks=tasks)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    if "matches no task" in message:
        assert all(repr(task) in str(error.value) for task in TASKS)


def test_tasks_and_episodes_that_share_nothing(multitask_root):
    with pytest.raises(RecipeError, match="has no episode among train_episodes"):
        split(multitask_root, tasks=["turning on the radio"], train_episodes=["1:3"])
    with pytest.raises(RecipeError, match="tasks is empty"):
        split(multitask_root, tasks=[])
