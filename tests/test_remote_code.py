"""What the remote-code export ships (the module closure, flat). That every family's output folders load with
``trust_remote_code=True`` where vla_recipes is not installed (DESIGN.md) is the family contract's
(tests/test_family_contract.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from transformers.dynamic_module_utils import get_imports

from vla_recipes.families import package_families
from vla_recipes.remote_code import auto_classes, flatten_imports, module_closure, write_remote_code


def test_module_closure_ships_every_imported_module_flat() -> None:
    for model_type in package_families():
        targets = auto_classes(model_type)
        files = module_closure([t.rpartition(".")[0] for t in targets.values()])
        assert {"normalize.py", "adapters.py"} <= set(files), model_type
        # what transformers requires installed before it runs the code: no vla_recipes, and no peft for full models
        required = set().union(*(get_imports(path) for path in files.values()))
        assert not required & {"vla_recipes", "peft", "lerobot"}, (model_type, required)
        for name, path in files.items():
            imports = [
                n for n in ast.walk(ast.parse(flatten_imports(path.read_text()))) if isinstance(n, ast.ImportFrom)
            ]
            relative = [(n.level, f"{n.module}.py") for n in imports if n.level]
            assert all(level == 1 and module in files for level, module in relative), (model_type, name, relative)
    assert flatten_imports("from ...data.normalize import x\n    from .sib import (a,\n") == (
        "from .normalize import x\n    from .sib import (a,\n"
    )


def test_unknown_model_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type 'nope' is not supported"):
        write_remote_code(tmp_path, "nope")


def test_transformers_own_export_cannot_ship_a_family_folder(tmp_path: Path) -> None:
    """Why :func:`write_remote_code` rewrites imports instead of ``register_for_auto_class`` + ``save_pretrained``:
    transformers' ``custom_object_save`` (what ``save_pretrained`` runs for a registered class) copies a module's
    ``from .x import`` siblings only and fails on an import from a parent package: the shared ``data/normalize.py``,
    ``models/adapters.py``, ``models/input_checks.py``, and OFT's imports of OpenVLA. Self-contained folders would
    hold copies of those (~2,300 lines over the three families). When this test fails, transformers follows parent
    imports: the rewriter can go."""
    from transformers.dynamic_module_utils import custom_object_save

    from vla_recipes.models.pi05 import Pi05Config

    with pytest.raises(FileNotFoundError, match=r"pi05/\.\.data\.normalize\.py"):
        custom_object_save(Pi05Config(), tmp_path)
