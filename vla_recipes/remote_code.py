"""Model code that travels with a saved folder, so ``trust_remote_code=True`` loads it without this package.

``AutoModel.from_pretrained(folder, trust_remote_code=True)`` (and ``AutoConfig`` / ``AutoProcessor``) reads the
``auto_map`` of the folder's JSON files and imports the named classes from ``.py`` files beside the weights.
transformers copies such files with their ``from .x import`` siblings only, so a module that imports from a parent
package (``from ...data.normalize import ...``) cannot travel as is: :func:`write_remote_code` collects every
module the model's classes import from this package, writes them side by side in the folder and rewrites those
imports to siblings (``from .normalize import ...``). The code itself is unchanged; only import lines move.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import logging
import re
from pathlib import Path

from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

PACKAGE = "vla_recipes"
logger = logging.getLogger(__name__)


def auto_classes(model_type: str) -> dict[str, str]:
    """The Auto class -> "module.Class" its family declares (``Family.auto_classes``)."""
    from vla_recipes.families import get_family

    return {auto: f"{cls.__module__}.{cls.__qualname__}" for auto, cls in get_family(model_type).auto_classes.items()}


_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)\.+(?:\w+\.)*(\w+)(\s+import\b)", flags=re.MULTILINE)


def module_closure(modules: list[str]) -> dict[str, Path]:
    """Every module of this package that ``modules`` import (relatively), by file name: the files to ship.

    Fails when a module imports this package absolutely (it could not be rewritten) or when two modules share a
    file name (they would overwrite each other in the flat folder)."""
    files: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        path = Path(importlib.util.find_spec(name).origin)
        if path.name in files:
            if files[path.name] != path:
                raise ValueError(f"remote code: {files[path.name]} and {path} would both be written as {path.name}")
            continue
        files[path.name] = path
        package = name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                if not node.module:
                    raise ValueError(f"remote code: {path} uses `from {'.' * node.level} import`; name the module")
                pending.append(importlib.util.resolve_name("." * node.level + node.module, package))
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n and n.split(".")[0] == PACKAGE for n in names):
                    raise ValueError(f"remote code: {path} imports {PACKAGE} absolutely; use a relative import")
    return files


def flatten_imports(source: str) -> str:
    """``from ...data.normalize import x`` -> ``from .normalize import x``: every module is a sibling in the folder."""
    return _RELATIVE_IMPORT.sub(r"\1.\2\3", source)


def _add_auto_map(config: dict, auto_map: dict[str, str]) -> None:
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map}


def _write_auto_maps(folder: Path, auto_map: dict[str, str]) -> None:
    """``config.json`` gets the whole map (every Auto class falls back on it). An image processor's own config
    (``preprocessor_config.json``, or nested in ``processor_config.json`` as transformers 5 saves it) names a class
    that transformers does not know, which stops the fallback: it needs its own entry."""
    for name in (CONFIG_NAME, PROCESSOR_NAME, IMAGE_PROCESSOR_NAME):
        if not (path := folder / name).is_file():
            continue
        config = json.loads(path.read_text())
        if name == CONFIG_NAME:
            _add_auto_map(config, auto_map)
        elif name == PROCESSOR_NAME:
            _add_auto_map(config, {"AutoProcessor": auto_map["AutoProcessor"]})
            if isinstance(config.get("image_processor"), dict):
                _add_auto_map(config["image_processor"], {"AutoImageProcessor": auto_map["AutoImageProcessor"]})
        else:
            _add_auto_map(config, {"AutoImageProcessor": auto_map["AutoImageProcessor"]})
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_remote_code(folder: str | Path, model_type: str) -> list[Path]:
    """Write the model's code and ``auto_map`` into a saved folder (weights or adapter + config, processor).

    Returns the code files written."""
    targets = auto_classes(model_type)
    if not all(target.startswith(f"{PACKAGE}.") for target in targets.values()):
        logger.warning(
            "remote code: %s's classes live outside %s; not written (their package ships them)", model_type, PACKAGE
        )
        return []
    folder = Path(folder)
    written = []
    for file_name, path in module_closure([t.rpartition(".")[0] for t in targets.values()]).items():
        (folder / file_name).write_text(flatten_imports(path.read_text()))
        written.append(folder / file_name)
    _write_auto_maps(folder, {auto: ".".join(target.split(".")[-2:]) for auto, target in targets.items()})
    return written
