"""Every `dim` example in README.md and docs/*.md runs, so the documentation cannot rot.

What counts as an example:

- In a fenced block marked ```bash (or sh, shell, zsh), every line whose command is `dim`,
  after optional `NAME=value` variables: `dim train images/`, `DIM_ESTIMATOR=dv dim train ...`.
  A line ending in a backslash continues on the next line. Other lines (torchrun, pip) are
  left alone.
- In a ```console block, the lines that start with `$ dim`; the other lines are output.
- Blocks marked text, python, toml or anything else are never run. A `dim` command in a block
  without a language fails `test_docs_markup_is_valid`: mark it bash or text.

Each example must exit 0, or N when its line ends with a comment `# exits N`. Examples run
with `typer`'s CliRunner, without a shell: no pipes, redirections or `$VARIABLES`.

An HTML comment on the line before a block changes how it is treated:

    <!-- docs-test: skip (REASON) -->   the block's examples are skipped, reported with REASON;
                                        only for hardware or programs this machine lacks, or
                                        for long runs another test covers
    <!-- docs-test: file NAME -->       the block's text is written to NAME before the next
                                        example of the file runs (a config file, say)

The examples of one Markdown file run in order, in one working folder that starts with:

    images/            80 training images, 8 per class folder (images/cat/0000.jpg, ...)
    test-images/       40 test images, 4 per class folder
    labels.csv         header path,label; paths relative to images/ (cat/0000.jpg,cat)
    test-labels.csv    the same for test-images/
    runs/latest        a finished tiny run trained on images/ (runs/base)

The images are the first ones of the bundled CIFAR-10 sample (dimcli.sample). Training is
kept tiny through the environment: DIM_MAX_STEPS=2, DIM_MI_UNITS=32, DIM_BATCH_SIZE=8,
DIM_WORKERS=0, DIM_DEVICE=cpu. Options an example gives still win over them, so an example
should not ask for a long run. A `--resume` example gets only the variables a resumed run may
change (a run keeps its width and batch size). HOME is the working folder, so
`dim --install-completion` writes there.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dimcli.cli import app
from dimcli.sample import subset_dir

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL_LANGS = frozenset({"bash", "sh", "shell", "zsh"})
CONSOLE_LANGS = frozenset({"console", "shell-session"})
N_TRAIN, N_TEST = 8, 4  # images per class in images/ and test-images/

TINY_ENV = {
    "DIM_MAX_STEPS": "2",
    "DIM_MI_UNITS": "32",
    "DIM_BATCH_SIZE": "8",
    "DIM_WORKERS": "0",
    "DIM_DEVICE": "cpu",
}
# A resumed run refuses a new width or batch size (dimcli.train._FROZEN), so it gets only these.
RESUME_ENV = ("DIM_MAX_STEPS", "DIM_WORKERS", "DIM_DEVICE")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip\s*\((?P<reason>.+)\)$")
_FILE = re.compile(r"^file\s+(?P<name>\S+)$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_EXITS = re.compile(r"#.*\bexits\s+(?P<code>\d+)\b")
_SHELL_ONLY = frozenset({"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "&>"})


# ==== reading the Markdown ====


@dataclass(frozen=True)
class Example:
    """One `dim` command of a document, as the test runs it."""

    doc: Path
    line: int
    text: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    expect: int = 0
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT).as_posix()}:{self.line}"


@dataclass(frozen=True)
class FileStep:
    """A block the docs show as a file; it is written into the working folder."""

    doc: Path
    line: int
    name: str
    text: str


@dataclass
class Block:
    """A fenced block: its language, first line number, lines and the directive before it."""

    line: int
    lang: str
    lines: list[tuple[int, str]] = field(default_factory=list)
    directive: str | None = None


def fenced_blocks(doc: Path, problems: list[str]) -> Iterator[Block]:
    """The fenced blocks of a Markdown file, in order, with the directive before each."""
    rel = doc.relative_to(ROOT).as_posix()
    lines = doc.read_text(encoding="utf-8").splitlines()
    pending: tuple[int, str] | None = None
    block: Block | None = None
    fence = ""
    for number, line in enumerate(lines, start=1):
        if block is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                yield block
                block = None
            else:
                block.lines.append((number, line))
            continue
        directive = _DIRECTIVE.match(line)
        if directive:
            if pending is not None:
                problems.append(f"{rel}:{pending[0]}: docs-test comment not followed by a block")
            pending = (number, directive["body"])
            continue
        opening = _FENCE.match(line)
        if opening:
            info = opening["info"].strip()
            block = Block(number, info.split()[0].lower() if info else "")
            fence = opening["fence"]
            if pending is not None:
                block.directive = pending[1]
                pending = None
        elif pending is not None and line.strip():
            problems.append(f"{rel}:{pending[0]}: docs-test comment not followed by a block")
            pending = None
    if block is not None:
        problems.append(f"{rel}:{block.line}: the block never closes")
    if pending is not None:
        problems.append(f"{rel}:{pending[0]}: docs-test comment not followed by a block")


def command_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line number, text) of each command of a shell or console block, continuations joined."""
    console = block.lang in CONSOLE_LANGS
    start, parts = 0, []  # the command being read: its first line and its pieces
    for number, raw in block.lines:
        text = raw.strip()
        if parts:
            text = text.removeprefix("> ")
        elif console and not text.startswith("$ "):
            continue  # output
        else:
            start, text = number, text.removeprefix("$ ")
        if text.endswith("\\"):
            parts.append(text[:-1].rstrip())
            continue
        yield start, " ".join([*parts, text])
        parts = []
    if parts:
        yield start, " ".join(parts)


def parse_example(doc: Path, line: int, text: str, problems: list[str]) -> Example | None:
    """The example on a command line, or None when its command is not `dim`."""
    where = f"{doc.relative_to(ROOT).as_posix()}:{line}"
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as err:
        if re.search(r"(^|\s)dim\s", text):
            problems.append(f"{where}: cannot split `{text}`: {err}")
        return None
    env: list[tuple[str, str]] = []
    while tokens and _ASSIGNMENT.match(tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env.append((name, value))
    if not tokens or tokens[0] != "dim":
        return None
    if any(t in _SHELL_ONLY or "$" in t or "`" in t for t in tokens):
        problems.append(
            f"{where}: `{text}` needs a shell (a pipe, redirection or variable); examples run "
            "without one: write one plain `dim` command per line"
        )
        return None
    exits = _EXITS.search(text)
    return Example(
        doc=doc,
        line=line,
        text=text,
        argv=tuple(tokens),
        env=tuple(env),
        expect=int(exits["code"]) if exits else 0,
    )


def collect(doc: Path, problems: list[str]) -> list[Example | FileStep]:
    """The examples and files of one document, in order."""
    rel = doc.relative_to(ROOT).as_posix()
    steps: list[Example | FileStep] = []
    for block in fenced_blocks(doc, problems):
        skip: str | None = None
        if block.directive is not None:
            as_skip, as_file = _SKIP.match(block.directive), _FILE.match(block.directive)
            if as_file:
                name = as_file["name"]
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    problems.append(f"{rel}:{block.line}: file {name} must stay in the folder")
                text = "\n".join(line for _, line in block.lines) + "\n"
                steps.append(FileStep(doc, block.line, name, text))
                continue
            if as_skip:
                skip = as_skip["reason"].strip()
            else:
                problems.append(
                    f"{rel}:{block.line}: unknown docs-test comment {block.directive!r}; "
                    "use 'skip (REASON)' or 'file NAME'"
                )
        if block.lang in SHELL_LANGS or block.lang in CONSOLE_LANGS:
            found = [
                example
                for number, text in command_lines(block)
                if (example := parse_example(doc, number, text, problems)) is not None
            ]
            if skip is not None and not found:
                problems.append(f"{rel}:{block.line}: a skip comment on a block without `dim`")
            steps.extend(
                Example(e.doc, e.line, e.text, e.argv, e.env, e.expect, skip) for e in found
            )
        elif block.lang == "":
            for number, raw in block.lines:
                if parse_example(doc, number, raw.strip().removeprefix("$ "), []) is not None:
                    problems.append(
                        f"{rel}:{number}: a `dim` command in a block without a language; mark "
                        "the block bash (it runs) or text (it is output)"
                    )
                    break
    return steps


def _read_all() -> tuple[dict[Path, list[Example | FileStep]], list[str]]:
    problems: list[str] = []
    steps = {}
    for doc in DOCS:
        if doc.is_file():  # README.md may not be written yet
            steps[doc] = collect(doc, problems)
    return steps, problems


STEPS, PROBLEMS = _read_all()
EXAMPLES = [step for steps in STEPS.values() for step in steps if isinstance(step, Example)]


# ==== the working folders ====


def write_labels(folder: Path, out: Path) -> None:
    """labels.csv for an image folder: each image's path and its class folder."""
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for path in sorted(folder.rglob("*.jpg")):
            rel = path.relative_to(folder)
            writer.writerow([rel.as_posix(), rel.parts[0]])


def invoke(example: Example, cwd: Path, env: dict[str, str]) -> None:
    """Run one example in `cwd` and fail the test unless it exits with the expected code."""
    env = dict(env)
    if "--resume" in example.argv or any(a.startswith("--resume=") for a in example.argv):
        env = {k: v for k, v in env.items() if k not in TINY_ENV or k in RESUME_ENV}
    env.update(example.env)
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(example.argv[1:]), env=env, prog_name="dim")
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()  # a command may set variables (OMP_NUM_THREADS); drop them
        os.environ.update(saved_env)
    if result.exit_code != example.expect:
        crash = ""
        if result.exc_info is not None and not isinstance(result.exception, SystemExit):
            crash = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(
            f"{example.where}: `{example.text}` exited with {result.exit_code}, expected "
            f"{example.expect}\n{result.output}{crash}",
            pytrace=False,
        )


class Workspace:
    """The working folder of one document; runs its steps in order, each at most once."""

    def __init__(self, root: Path, steps: list[Example | FileStep], env: dict[str, str]) -> None:
        self.root = root
        self.steps = [s for s in steps if not (isinstance(s, Example) and s.skip)]
        self.env = {**env, "HOME": str(root)}
        self.done = 0

    def run(self, example: Example) -> None:
        """Run `example`, after any earlier step not yet run (when tests were selected)."""
        index = self.steps.index(example)
        while self.done < index:
            step = self.steps[self.done]
            self.done += 1
            if isinstance(step, FileStep):
                target = self.root / step.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(step.text, encoding="utf-8")
            else:
                invoke(step, self.root, self.env)
        self.done = index + 1
        invoke(example, self.root, self.env)


@pytest.fixture(scope="session")
def doc_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of every example: tiny training, a private sample cache, no colour."""
    cache = tmp_path_factory.mktemp("cache")
    return {**TINY_ENV, "DIM_CACHE_DIR": str(cache), "NO_COLOR": "1", "COLUMNS": "120"}


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory: pytest.TempPathFactory, doc_env: dict[str, str]) -> Path:
    """The folder every document starts from: images, labels and a finished tiny run."""
    base = tmp_path_factory.mktemp("docs-base")
    sample = subset_dir(N_TRAIN, N_TEST, cache=Path(doc_env["DIM_CACHE_DIR"]))
    shutil.copytree(sample / "train", base / "images")
    shutil.copytree(sample / "test", base / "test-images")
    write_labels(base / "images", base / "labels.csv")
    write_labels(base / "test-images", base / "test-labels.csv")
    train = Example(ROOT, 0, "(setup)", ("dim", "train", "images/", "--out", "runs/base", "-q"))
    invoke(train, base, doc_env)
    shutil.rmtree(base / "runs" / "base" / "checkpoint.prev", ignore_errors=True)
    return base


@pytest.fixture(scope="session")
def workspace(
    tmp_path_factory: pytest.TempPathFactory, base_folder: Path, doc_env: dict[str, str]
) -> Callable[[Path], Workspace]:
    """`workspace(doc)`: the document's working folder, a copy of the base made on first use."""
    made: dict[Path, Workspace] = {}

    def get(doc: Path) -> Workspace:
        if doc not in made:
            root = tmp_path_factory.mktemp(doc.stem)
            shutil.copytree(base_folder, root, symlinks=True, dirs_exist_ok=True)
            made[doc] = Workspace(root, STEPS[doc], doc_env)
        return made[doc]

    return get


# ==== tests ====


def test_docs_markup_is_valid() -> None:
    assert not PROBLEMS, "\n".join(PROBLEMS)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_example(example: Example, workspace: Callable[[Path], Workspace]) -> None:
    if example.skip:
        pytest.skip(f"{example.where}: {example.skip}")
    workspace(example.doc).run(example)


def test_usage_documents_every_command_and_option() -> None:
    """docs/usage.md has a section per command naming each option, and runs each command."""
    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    ctx = group.make_context("dim", ["--help"], resilient_parsing=True)
    usage_examples = [e for e in EXAMPLES if e.doc.name == "usage.md"]
    missing = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        match = re.search(rf"^## `dim {name}`\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        if match is None:
            missing.append(f"a section '## `dim {name}`'")
            continue
        section = match[1]
        for param in command.params:
            names = (
                [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else []
            )
            if param.param_type_name == "argument":
                names = [param.metavar or (param.name or "").upper()]
            missing += [f"{n} in the section of dim {name}" for n in names if n not in section]
        if not any(e.argv[1:2] == (name,) and not e.skip for e in usage_examples):
            missing.append(f"a runnable example of dim {name}")
    assert not missing, "docs/usage.md lacks:\n" + "\n".join(missing)
