"""The docs name only what exists: every page (README.md, docs/*.md) is read as a user would copy from it.

Checked on each page:
- a repository path in code (``recipes/...``, ``benchmarks/...``, ``accelerate_configs/...``, ...) exists; globs and
  ``{a,b}`` alternatives are expanded, ``<placeholders>`` are skipped;
- a command in a shell block or inline code: ``make <target>`` is a Makefile target; a ``--flag`` given to
  ``recipes/sft.py`` (also under ``accelerate launch``) is a recipe key (a field of ``ModelArguments``,
  ``DataArguments`` or ``VLATrainingArguments``); a ``--flag`` of another ``recipes/*.py`` is in that script's
  ``--help`` (run in-process: no subprocess, no model); a ``--flag`` of another Python script or ``python -m`` module
  is one its parser adds; ``accelerate launch``'s own flags are accelerate's; ``vla-recipes <cmd> --flag`` (the
  console script of ``[project.scripts]``, when pyproject declares it) is checked as ``recipes/<cmd>.py``;
- a ``vla_recipes.module.name`` in code (and a ``from vla_recipes.module import name``) is defined there, read from
  the module's source;
- every top-level key of a ``yaml`` block is a recipe key (a ``datasets:`` entry's keys are a mixture entry's);
- every relative link resolves, to a file and, with ``#anchor``, to a heading of that page.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import io
import itertools
import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("recipes", "benchmarks", "accelerate_configs", "vla_recipes", "tests", "docs", ".ci")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # an inline span may wrap onto the next line
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(map(re.escape, REPO_DIRS))})/[^\s`'\"(),;]*)")
NAME = re.compile(r"(?<![\w./-])vla_recipes(?:\.\w+)+")
FROM_IMPORT = re.compile(r"^\s*from (vla_recipes[\w.]*) import \(?([\w, ]+)", re.M)
COMMAND_START = ("python", "accelerate", "make", "vla-recipes", "bash", "sbatch")


# --- what exists -----------------------------------------------------------------------------------------------------


@functools.cache
def recipe_keys() -> frozenset[str]:
    """What ``recipes/sft.py`` accepts as ``--key`` or a YAML key: the three argument groups' fields (+ ``config``)."""
    from vla_recipes.configs import DataArguments, ModelArguments, VLATrainingArguments

    groups = (ModelArguments, DataArguments, VLATrainingArguments)
    return frozenset({"config", *(f.name for cls in groups for f in dataclasses.fields(cls))})


@functools.cache
def mixture_entry_keys() -> frozenset[str]:
    from vla_recipes.data.mixture import ENTRY_KEYS

    return frozenset({"name", "weight", *ENTRY_KEYS})


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"^([\w .-]+?)\s*:(?!=)", line)  # `a b: deps`; not `X := value` nor `$(VENV)/...:`
        if rule and not line.startswith((".", "\t")):
            targets.update(rule.group(1).split())
    return frozenset(targets)


@functools.cache
def console_scripts() -> dict[str, str]:
    """The console commands pyproject.toml declares (``[project.scripts]``): name -> the module that runs it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {name: target.split(":")[0] for name, target in project.get("scripts", {}).items()}


def _options(help_text: str) -> frozenset[str]:
    return frozenset(re.findall(r"(?<![\w-])--[\w-]+", help_text))


@functools.cache
def help_flags(script: str) -> frozenset[str] | str:
    """The ``--options`` in ``<script> --help``, run in-process as ``__main__`` (the parser, wherever the script
    builds it, without loading a model); a string when ``--help`` fails."""
    out, code = io.StringIO(), "no exit"
    argv = mock.patch.object(sys, "argv", [script, "--help"])
    with argv, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        return f"`{script} --help` failed ({code}): {out.getvalue()[-300:]}"
    return _options(out.getvalue())


@functools.cache
def parser_flags(path: Path) -> frozenset[str]:
    """The ``--options`` a script's own ``add_argument`` calls declare, read from its source (a benchmark or a
    ``python -m`` module is not run: some set threads or import heavy peers at import time)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--"))
    return frozenset(flags)


@functools.cache
def accelerate_flags() -> frozenset[str]:
    """``accelerate launch``'s options (its help hides the groups ``sys.argv`` does not select: show them all)."""
    from accelerate.commands.launch import launch_command_parser

    with mock.patch.object(sys, "argv", ["accelerate", "launch", "--help"]):
        return _options(launch_command_parser().format_help())


# --- reading a page --------------------------------------------------------------------------------------------------


def expand(path: str) -> list[str]:
    """``a/{b,c}.yaml`` -> ``a/b.yaml``, ``a/c.yaml`` (shell brace expansion, as the docs write alternatives)."""
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", path)
    options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(choice) for choice in itertools.product(*options)]


def slugs(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to hyphens, -1 for a
    repeat)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def commands(code: str) -> list[list[str]]:
    """The commands of a shell snippet: continuation lines joined, comments dropped, split at ``&&``, ``;``, ``|``."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        for is_sep, group in itertools.groupby(tokens, key=lambda t: t in ("&&", "||", ";", "|")):
            if not is_sep:
                words = list(itertools.dropwhile(lambda t: re.match(r"^[A-Z_]+=", t), group))  # VAR=value cmd
                if words:
                    found.append(words)
    return found


def flags_of(args: list[str]) -> list[str]:
    """The ``--flags`` among a command's arguments (``[--batch 8]`` optional ones too), without ``=value``."""
    flags = (a.strip("[]").split("=")[0] for a in args)
    return [f for f in flags if f.startswith("--") and "<" not in f and f != "--help"]


def check_script_flags(script: str, flags: list[str], where: str) -> list[str]:
    if not (ROOT / script).is_file():
        return [f"{where}: {script} does not exist"]
    if script == "recipes/sft.py":
        keys = recipe_keys()
        return [
            f"{where}: {flag} is not a recipe key (ModelArguments, DataArguments, VLATrainingArguments)"
            for flag in flags
            if (name := flag[2:].replace("-", "_")) not in keys and name.removeprefix("no_") not in keys
        ]
    if not flags:
        return []
    known = help_flags(script) if script.startswith("recipes/") else parser_flags(ROOT / script)
    if isinstance(known, str):
        return [f"{where}: {known}"]
    return [f"{where}: {script} has no option {flag}" for flag in flags if flag not in known]


def check_command(words: list[str], where: str) -> list[str]:
    """One command's program, script, subcommand and flags."""
    program, args = words[0], words[1:]
    if program == "make":
        return [
            f"{where}: make {t}: no such Makefile target"
            for t in args
            if not t.startswith("-") and "=" not in t and t != "..." and t not in make_targets()
        ]
    if program == "accelerate" and args[:1] == ["launch"]:
        args = args[1:]
        i = next((i for i, a in enumerate(args) if a.endswith(".py") or a == "-m"), len(args))
        problems = [
            f"{where}: accelerate launch has no option {flag}"
            for flag in flags_of(args[:i])
            if "--" + flag[2:].replace("-", "_") not in accelerate_flags()
        ]
        if i < len(args) and args[i] == "-m":
            return problems + check_command(["python", *args[i:]], where)
        return problems + (check_script_flags(args[i], flags_of(args[i + 1 :]), where) if i < len(args) else [])
    if program == "vla-recipes":
        if program not in console_scripts():
            return [f"{where}: vla-recipes is not a console script in pyproject.toml's [project.scripts]"]
        if not args or args[0] in ("--help", "-h") or "<" in args[0]:  # the command list, or a placeholder
            return []
        if not (ROOT / "recipes" / f"{args[0]}.py").is_file():
            return [f"{where}: vla-recipes has no subcommand {args[:1]} (one per recipes/<command>.py)"]
        return check_script_flags(f"recipes/{args[0]}.py", flags_of(args[1:]), where)
    if re.fullmatch(r"(.*/)?python[\d.]*", program):
        args = [a for a in args if a not in ("-u", "-O")]
        if args[:1] == ["-m"] and args[1:2] == [console_scripts().get("vla-recipes")]:  # python -m vla_recipes.cli sft
            return check_command(["vla-recipes", *args[2:]], where)
        if args[:1] == ["-m"] and len(args) > 1 and args[1].startswith("vla_recipes"):
            module = ROOT / args[1].replace(".", "/")
            path = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__main__.py"
            if not path.is_file():
                return [f"{where}: python -m {args[1]}: no such module in the package"]
            return [f"{where}: {args[1]} has no option {f}" for f in flags_of(args[2:]) if f not in parser_flags(path)]
        if args and args[0].endswith(".py") and "<" not in args[0]:
            return check_script_flags(args[0], flags_of(args[1:]), where)
    return []


def check_path(path: str, where: str) -> list[str]:
    path = path.rstrip(".")
    if "<" in path or "..." in path:
        return []
    return [
        f"{where}: {candidate} does not exist"
        for candidate in expand(path)
        if not (any(ROOT.glob(candidate)) if any(c in candidate for c in "*?[") else (ROOT / candidate).exists())
    ]


@functools.cache
def top_level_names(module: Path) -> frozenset[str] | None:
    """What a module defines or imports at its top level (``None``: a module ``__getattr__`` makes any name)."""
    names: set[str] = set()
    body = list(ast.parse(module.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If | ast.Try):
            body += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            body += node.body
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
    return None if "__getattr__" in names else frozenset(names)


def check_name(dotted: str, where: str) -> list[str]:
    """``vla_recipes.a.b.name``: the longest module prefix is a file of the package and defines ``name``."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            break
    rest, names = parts[i:], top_level_names(module)
    if not rest or names is None or rest[0] in names:
        return []
    return [f"{where}: {'.'.join(parts[:i])} has no {rest[0]}"]


def check_yaml(code: str, where: str) -> list[str]:
    try:
        recipe = yaml.safe_load(code)
    except yaml.YAMLError as e:
        return [f"{where}: a yaml block that is not valid YAML: {' '.join(str(e).split())}"]
    if not isinstance(recipe, dict):
        return [f"{where}: a yaml block that is not a mapping of recipe keys"]
    problems = [f"{where}: {key!r} is not a recipe key" for key in recipe if key not in recipe_keys()]
    for entry in recipe.get("datasets") or []:
        problems += [
            f"{where}: {key!r} is not a datasets entry key" for key in entry if key not in mixture_entry_keys()
        ]
    return problems


def check_page(page: Path, text: str) -> list[str]:
    """Everything on one page that names something missing, one line each (``page:line: what``)."""
    name = page.relative_to(ROOT)
    problems: list[str] = []

    def where(offset: int) -> str:
        return f"{name}:{text.count(chr(10), 0, offset) + 1}"

    for block in FENCE.finditer(text):
        lang, code, at = block.group(1), block.group(2), where(block.start())
        problems += [p for path in REPO_PATH.findall(code) for p in check_path(path, at)]
        problems += [p for dotted in NAME.findall(code) for p in check_name(dotted, at)]
        for module, imported in FROM_IMPORT.findall(code):
            names = filter(None, imported.replace(" ", "").split(","))
            problems += [p for name in names for p in check_name(f"{module}.{name}", at)]
        if lang in SHELL_LANGS:
            problems += [p for words in commands(code) for p in check_command(words, at)]
        elif lang == "yaml":
            problems += check_yaml(code, at)
    blank = functools.partial(re.sub, r"[^\n]", " ")  # keeps every offset, so `where` still finds the line
    prose = FENCE.sub(lambda block: blank(block.group(0)), text)
    for span in INLINE.finditer(prose):
        code, at = span.group(1), where(span.start())
        problems += [p for path in REPO_PATH.findall(code) for p in check_path(path, at)]
        problems += [p for dotted in NAME.findall(code) for p in check_name(dotted, at)]
        if code.startswith(COMMAND_START):
            problems += [p for words in commands(code.replace("\n", " ")) for p in check_command(words, at)]
    for link in LINK.finditer(INLINE.sub(lambda span: blank(span.group(0)), prose)):
        target, at = link.group(1), where(link.start())
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            problems.append(f"{at}: the link ({target}) points to a file that does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in slugs(resolved.read_text()):
            problems.append(f"{at}: the link ({target}) names a heading {resolved.name} does not have")
    return problems


# --- the tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_names_only_what_exists(page: Path) -> None:
    problems = check_page(page, page.read_text())
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page() -> None:
    """The two commands come first, the page stays short, and it links every docs page."""
    text = (ROOT / "README.md").read_text()
    first_block = FENCE.search(text).group(2)
    assert [words[:2] for words in commands(first_block)] == [["make", "demo"], ["make", "test"]]
    assert len(text.splitlines()) <= 250
    assert {p.name for p in PAGES[1:]} <= {Path(t).name for t in LINK.findall(text) if t.startswith("docs/")}


def test_every_recipe_is_in_the_catalogue() -> None:
    """A recipe file added to recipes/ is listed in docs/recipes.md (paths there are relative to recipes/)."""
    named = {p for span in INLINE.findall((ROOT / "docs" / "recipes.md").read_text()) for p in expand(span)}
    recipes = {str(p.relative_to(ROOT / "recipes")) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert sorted(recipes - named) == []


FAKE_PAGE = """# A page with mistakes

See [the hardware page](hardware.md#no-such-heading), [a missing page](nowhere.md) and [a fine one](recipes.md).

```bash
accelerate launch --config_file accelerate_configs/single_gpu.yaml --num_processez 2 recipes/sft.py \\
    --config recipes/demo/openvla.yaml --lerning_rate 1e-4 --max_steps 10
python recipes/evaluate.py --model out --batch_size 4 --plot_everything
python recipes/nonexistent.py --x 1
python benchmarks/inference.py --batch 8 --turbo
python -m vla_recipes.data.synthetic --root data/x --num_frames 3
make demo && make deploy
```

```yaml
learning_rate: 1e-4
finetune_mood: lora
datasets:
  - {dataset_repo_id: a/b, weight: 2, speed: 3}
```

```python
from vla_recipes.metrics import METRICS, NO_SUCH_METRIC
```

The blocks are `vla_recipes.distributed.NO_SUCH_BLOCKS`; the policy is `vla_recipes.evaluation.ChunkedPolicy`.
Copy `recipes/pi05/custom/lora.yaml` or `recipes/pi05/imaginary/full.yaml`, then
`python recipes/rollout.py --env pusht --n_episodes 2 --n_epsiodes 3`.
"""


def test_a_page_with_made_up_names_fails() -> None:
    """Each made-up key, flag, script, target and link of a fake page is reported; its real ones are not."""
    problems = "\n".join(check_page(ROOT / "docs" / "fake.md", FAKE_PAGE))
    assert "fake.md:3: the link (nowhere.md)" in problems  # the culprit's page and line
    for culprit in (
        "no-such-heading",
        "nowhere.md",
        "accelerate launch has no option --num_processez",
        "--lerning_rate is not a recipe key",
        "recipes/evaluate.py has no option --plot_everything",
        "recipes/nonexistent.py does not exist",
        "benchmarks/inference.py has no option --turbo",
        "vla_recipes.data.synthetic has no option --num_frames",
        "make deploy: no such Makefile target",
        "'finetune_mood' is not a recipe key",
        "'speed' is not a datasets entry key",
        "recipes/pi05/imaginary/full.yaml does not exist",
        "recipes/rollout.py has no option --n_epsiodes",
        "vla_recipes.metrics has no NO_SUCH_METRIC",
        "vla_recipes.distributed has no NO_SUCH_BLOCKS",
    ):
        assert culprit in problems
    for fine in (
        "--max_steps",
        "--batch_size",
        "--batch ",
        "--root",
        "make demo:",
        "learning_rate",
        "recipes.md)",
        "custom/lora.yaml",
        "--n_episodes ",
        "--port",
    ):
        assert fine not in problems


CONSOLE_PAGE = """```bash
vla-recipes evaluate --model out --batch_size 4 --plot_everything
accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vla_recipes.cli sft \\
    --config recipes/demo/openvla.yaml --max_steps 5 --lerning_rate 1e-4
python -m vla_recipes.cli serve --port 0 --warp_speed
vla-recipes frobnicate --x 1
```
"""


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "not-declared"])
def test_console_commands_are_checked_as_their_scripts(monkeypatch, declared: bool) -> None:
    """``vla-recipes <cmd>`` (and ``-m <its module> <cmd>``) takes ``recipes/<cmd>.py``'s flags once pyproject.toml
    declares it, and is refused while it does not."""
    scripts = {"vla-recipes": "vla_recipes.cli"} if declared else {}
    monkeypatch.setattr(sys.modules[__name__], "console_scripts", lambda: scripts)
    problems = "\n".join(check_page(ROOT / "docs" / "fake.md", CONSOLE_PAGE))
    if declared:
        for culprit in (
            "recipes/evaluate.py has no option --plot_everything",
            "--lerning_rate is not a recipe key",
            "recipes/serve.py has no option --warp_speed",
            "vla-recipes has no subcommand ['frobnicate']",
        ):
            assert culprit in problems
        for fine in ("--batch_size", "--max_steps", "--port", "--config"):
            assert fine not in problems
    else:
        assert problems.count("vla-recipes is not a console script") == 2
