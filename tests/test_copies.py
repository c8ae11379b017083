"""Keep the code that the method scripts copy from ddpm.py identical to its source.

Policy (CONVENTIONS.md "Layout", STYLE.md item 12). Every method script is self-contained, so code
it shares with `ddpm.py` is copied on purpose, as in Hugging Face transformers' single-model-file
policy. A copy is marked by a full-line comment directly above the copied block:

    # Copied from ddpm.EMA
    # Copied from ddpm.ResBlock with ResBlock->PatchResBlock
    # Copied from ddpm.load_dataset with ddpm->patch_ddpm, UNet->PatchUNet
    # Copied from ddpm.IMAGE_EXTENSIONS
        # Copied from ddpm.UNet.forward

The name after `ddpm.` is a top-level class, function or constant assignment of `ddpm.py`, or a
dotted path into a class (`UNet.forward`). The block is located with `ast`: it runs from the first
decorator line (or the `def`/`class`/assignment line) to the node's `end_lineno`, so comments after
the last statement of a body are not part of it. The marker must sit on the line directly above
the block, above its decorators.

The copy must equal the source block after the renames: each `A->B` is applied, in order, as plain
text replacement, and the block is re-indented to the copy's indentation. Text is compared exactly,
line by line. Change shared code in `ddpm.py` first, then run the fixer.

Usage:

    python tests/test_copies.py                 # check every *.py in the repo root but ddpm.py
    python tests/test_copies.py patch_ddpm.py   # check only the files given
    python tests/test_copies.py --fix           # rewrite drifted copies from ddpm.py
    python -m pytest tests/test_copies.py       # the same check, plus tests of this checker

Each drift prints `file:line: copy of ddpm.X differs from its source` (line of the marker) and a
unified diff from the copy to what `--fix` writes. A marker that is malformed, names something
`ddpm.py` does not define, or has no class, function or assignment below it is an error that
`--fix` cannot repair. Exit status: 1 on drift (without `--fix`) or on any error, 0 otherwise.
Copies must not be nested inside other marked copies.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_FILE = "ddpm.py"

MARKER_RE = re.compile(r"#\s*Copied from\b")
SPEC_RE = re.compile(
    r"#\s*Copied from ddpm\.(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
    r"(?:\s+with\s+(?P<renames>.+?))?\s*"
)
RENAME_RE = re.compile(r"\s*(?P<old>\S+?)\s*->\s*(?P<new>\S+)\s*")
BLOCK_TYPES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign, ast.AnnAssign)


# --------------------------------------------------------------------------------------------------
# Checker
# --------------------------------------------------------------------------------------------------


class Copy(NamedTuple):
    """A valid marker and the block below it. Lines are 1-based; `end` is inclusive."""

    marker_line: int
    name: str
    start: int
    end: int
    actual: list[str]
    expected: list[str]


def block_start(node: ast.stmt) -> int:
    """First line of a block: its first decorator, else the statement itself."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def defined_names(node: ast.stmt) -> list[str]:
    """Names a class, function or assignment binds at its own level."""
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign):
        return [node.target.id] if isinstance(node.target, ast.Name) else []
    return [node.name]


def resolve(tree: ast.Module, dotted: str) -> ast.stmt | None:
    """The node `dotted` names in `tree` (`UNet.forward` descends into class UNet), or None."""
    node, body = None, tree.body
    for part in dotted.split("."):
        matches = [n for n in body if isinstance(n, BLOCK_TYPES) and part in defined_names(n)]
        if not matches:
            return None
        node = matches[0]
        body = node.body if isinstance(node, ast.ClassDef) else []
    return node


def parse_marker(comment: str) -> tuple[str, list[tuple[str, str]]] | None:
    """`# Copied from ddpm.X with A->B, C->D` -> ("X", [("A", "B"), ("C", "D")]).

    Returns None if the comment does not have that form.
    """
    spec = SPEC_RE.fullmatch(comment)
    if spec is None:
        return None
    renames = []
    for part in spec["renames"].split(",") if spec["renames"] else []:
        rename = RENAME_RE.fullmatch(part)
        if rename is None:
            return None
        renames.append((rename["old"], rename["new"]))
    return spec["name"], renames


def find_markers(text: str) -> list[tuple[int, str]]:
    """(line, comment) of every full-line `# Copied from` comment. Strings are not comments."""
    markers = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if (
            tok.type == tokenize.COMMENT
            and not tok.line[: tok.start[1]].strip()
            and MARKER_RE.match(tok.string)
        ):
            markers.append((tok.start[0], tok.string))
    return markers


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def expected_block(
    source_lines: list[str], node: ast.stmt, indent: str, renames: list[tuple[str, str]]
) -> list[str]:
    """The source block with the renames applied, re-indented from its indentation to `indent`."""
    block = source_lines[block_start(node) - 1 : node.end_lineno]
    text = "\n".join(block)
    for old, new in renames:
        text = text.replace(old, new)
    source_indent = indentation(block[0])
    return [
        indent + line[len(source_indent) :]
        if line.strip() and line.startswith(source_indent)
        else line
        for line in text.split("\n")
    ]


def check_file(path: Path, display: str, source: tuple[ast.Module, list[str]] | None):
    """All marked copies in `path`, and one message per invalid marker."""
    text = path.read_text()
    lines = text.split("\n")
    nodes = ast.walk(ast.parse(text, str(path)))
    starts = {block_start(n): n for n in nodes if isinstance(n, BLOCK_TYPES)}
    copies, errors = [], []
    for line, comment in find_markers(text):
        where = f"{display}:{line}:"
        parsed = parse_marker(comment)
        if parsed is None:
            errors.append(
                f'{where} malformed marker "{comment}"; '
                'expected "# Copied from ddpm.NAME [with A->B, C->D]"'
            )
            continue
        name, renames = parsed
        target = starts.get(line + 1)
        if target is None:
            errors.append(
                f"{where} marker for ddpm.{name} is not directly above "
                "a class, function or assignment"
            )
            continue
        if source is None:
            errors.append(f"{where} copy of ddpm.{name}: {SOURCE_FILE} not found")
            continue
        source_tree, source_lines = source
        node = resolve(source_tree, name)
        if node is None:
            errors.append(f"{where} copy of ddpm.{name}: {SOURCE_FILE} defines no {name}")
            continue
        start, end = line + 1, target.end_lineno
        expected = expected_block(source_lines, node, indentation(lines[start - 1]), renames)
        copies.append(Copy(line, name, start, end, lines[start - 1 : end], expected))
    return copies, errors


def fix_file(path: Path, drifted: list[Copy]) -> None:
    """Replace each drifted block by its expected text, bottom-up so earlier line numbers hold."""
    lines = path.read_text().split("\n")
    for copy in sorted(drifted, key=lambda c: c.start, reverse=True):
        lines[copy.start - 1 : copy.end] = copy.expected
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    """Check (or with --fix, rewrite) the marked copies; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="tests/test_copies.py",
        description="Check that '# Copied from ddpm.X' blocks match ddpm.py "
        "(the module docstring explains the policy).",
    )
    parser.add_argument(
        "files", nargs="*", type=Path,
        help="files to check (default: every *.py in the repository root except ddpm.py)",
    )
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from ddpm.py")
    args = parser.parse_args(argv)

    root = (root or REPO_ROOT).resolve()
    source_path = root / SOURCE_FILE
    source = None
    if source_path.exists():
        source_text = source_path.read_text()
        source = ast.parse(source_text, str(source_path)), source_text.split("\n")
    files = args.files or sorted(p for p in root.glob("*.py") if p.name != SOURCE_FILE)

    checked = drifted = 0
    all_errors = []
    for path in files:
        resolved = path.resolve()
        display = str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)
        copies, errors = check_file(path, display, source)
        all_errors += errors
        drifts = [c for c in copies if c.actual != c.expected]
        checked += len(copies)
        drifted += len(drifts)
        for copy in drifts:
            print(f"{display}:{copy.marker_line}: copy of ddpm.{copy.name} differs from its source")
            diff = difflib.unified_diff(
                copy.actual, copy.expected, lineterm="", n=1,
                fromfile=f"{display}:{copy.start}", tofile=f"ddpm.{copy.name} (after renames)",
            )
            print("\n".join(diff))
        if args.fix and drifts:
            fix_file(path, drifts)

    for error in all_errors:
        hint = " (--fix cannot repair this; edit the marker or ddpm.py)" if args.fix else ""
        print(error + hint)
    summary = f"{checked} copies checked, {drifted} drifted"
    if args.fix and drifted:
        summary += f", {drifted} rewritten"
    if all_errors:
        summary += f", {len(all_errors)} invalid markers"
    print(summary)
    return int(bool(all_errors) or (drifted > 0 and not args.fix))


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

FAKE_DDPM = '''\
"""Fake baseline."""
import functools

IMAGE_EXTENSIONS = (".png", ".jpg")


class EMA:
    """Exponential moving average of the weights."""

    def __init__(self, decay):
        self.decay = decay


class UNet:
    def __init__(self, channels):
        self.channels = channels

    def forward(self, x):
        # (B, C, H, W) -> (B, C, H, W)
        return x * self.channels


@functools.lru_cache(maxsize=None)
def load_dataset(path):
    """Load the ddpm dataset for the UNet."""
    return [path, "ddpm"]
'''

METHOD = '''\
"""Fake method script.

A marker quoted in a docstring is no marker:

    # Copied from ddpm.DoesNotExist
"""
import functools

# Copied from ddpm.IMAGE_EXTENSIONS
IMAGE_EXTENSIONS = (".png", ".jpg")


# Copied from ddpm.EMA
class EMA:
    """Exponential moving average of the weights."""

    def __init__(self, decay):
        self.decay = decay


class PatchUNet:
    def __init__(self, channels, patch_size):
        self.channels = channels
        self.patch_size = patch_size  # Copied from the paper; a trailing comment is no marker.

    # Copied from ddpm.UNet.forward
    def forward(self, x):
        # (B, C, H, W) -> (B, C, H, W)
        return x * self.channels


# Copied from ddpm.load_dataset with ddpm->patch_ddpm, UNet->PatchUNet
@functools.lru_cache(maxsize=None)
def load_dataset(path):
    """Load the patch_ddpm dataset for the PatchUNet."""
    return [path, "patch_ddpm"]


def main():
    return 0
'''


def write_repo(root: Path, method: str = METHOD) -> Path:
    (root / SOURCE_FILE).write_text(FAKE_DDPM)
    path = root / "method.py"
    path.write_text(method)
    return path


def marker_line(text: str, name: str) -> int:
    """Line number of the `# Copied from ddpm.<name>` marker in `text`."""
    pattern = re.compile(rf"\s*# Copied from ddpm\.{re.escape(name)}\b.*")
    return next(i for i, line in enumerate(text.split("\n"), 1) if pattern.fullmatch(line))


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_repository_has_no_drift(capsys):
    assert main([]) == 0, capsys.readouterr().out


def test_command_line_checks_the_repository():
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\d+ copies checked, 0 drifted$", result.stdout, re.MULTILINE)


def test_correct_copies_pass(tmp_path, capsys):
    write_repo(tmp_path)
    assert main([], root=tmp_path) == 0
    assert capsys.readouterr().out.strip() == "4 copies checked, 0 drifted"


DRIFTS = {
    "body": ("EMA", "        self.decay = decay\n", "        self.decay = float(decay)\n"),
    "missing rename": ("load_dataset", "the PatchUNet.", "the UNet."),
    "decorator": ("load_dataset", "lru_cache(maxsize=None)", "lru_cache(maxsize=8)"),
    "constant": ("IMAGE_EXTENSIONS", '(".png", ".jpg")', '(".png",)'),
    "method": ("UNet.forward", "return x * self.channels", "return x + self.channels"),
    "method comment": ("UNet.forward", "# (B, C, H, W) -> (B, C, H, W)", "# (B, C, H, W)"),
    "trailing space": ("UNet.forward", "return x * self.channels\n", "return x * self.channels \n"),
    "extra line": ("EMA", "self.decay = decay\n", "self.decay = decay\n        self.step = 0\n"),
}


def test_drift_is_reported_at_the_marker_line(tmp_path, capsys):
    for case, (name, old, new) in DRIFTS.items():
        drifted = replace_once(METHOD, old, new)
        write_repo(tmp_path, drifted)
        assert main([], root=tmp_path) == 1, case
        out = capsys.readouterr().out
        line = marker_line(drifted, name)
        assert f"method.py:{line}: copy of ddpm.{name} differs from its source" in out, case
        assert out.count("differs from its source") == 1, case
        assert out.strip().endswith("4 copies checked, 1 drifted"), case


def test_diff_shows_copy_and_source_lines(tmp_path, capsys):
    write_repo(tmp_path, replace_once(METHOD, "self.decay = decay", "self.decay = float(decay)"))
    main([], root=tmp_path)
    out = capsys.readouterr().out
    assert "\n-        self.decay = float(decay)\n" in out
    assert "\n+        self.decay = decay\n" in out


def test_source_change_is_drift(tmp_path, capsys):
    path = write_repo(tmp_path)
    changed = replace_once(FAKE_DDPM, "x * self.channels", "x * 2 * self.channels")
    (tmp_path / SOURCE_FILE).write_text(changed)
    assert main([], root=tmp_path) == 1
    line = marker_line(path.read_text(), "UNet.forward")
    assert f"method.py:{line}: copy of ddpm.UNet.forward differs" in capsys.readouterr().out


def test_fix_restores_copies_and_keeps_the_rest(tmp_path, capsys):
    drifted = METHOD
    for name in ("extra line", "missing rename", "constant", "method"):
        _, old, new = DRIFTS[name]
        drifted = replace_once(drifted, old, new)
    outside = ("    return 0\n", "    # Not a copy: left alone.\n    return 1\n")
    path = write_repo(tmp_path, replace_once(drifted, *outside))

    assert main(["--fix"], root=tmp_path) == 0
    assert "4 copies checked, 4 drifted, 4 rewritten" in capsys.readouterr().out
    assert path.read_text() == replace_once(METHOD, *outside)
    assert main([], root=tmp_path) == 0


def test_missing_source_is_an_error_that_fix_cannot_repair(tmp_path, capsys):
    method = METHOD + "\n\n# Copied from ddpm.Missing\ndef missing():\n    pass\n"
    method += "\n\n# Copied from ddpm.UNet.backward\ndef backward():\n    pass\n"
    method += "\n\n# Copied from ddpm.load_dataset.inner\ndef inner():\n    pass\n"
    path = write_repo(tmp_path, method)
    for argv in ([], ["--fix"]):
        assert main(argv, root=tmp_path) == 1
        out = capsys.readouterr().out
        for name in ("Missing", "UNet.backward", "load_dataset.inner"):
            line = marker_line(method, name)
            assert f"method.py:{line}: copy of ddpm.{name}: ddpm.py defines no {name}" in out
        assert out.strip().endswith("4 copies checked, 0 drifted, 3 invalid markers")
    assert "--fix cannot repair this" in out
    assert path.read_text() == method


def test_missing_ddpm_file_is_an_error(tmp_path, capsys):
    write_repo(tmp_path)
    (tmp_path / SOURCE_FILE).unlink()
    assert main([], root=tmp_path) == 1
    out = capsys.readouterr().out
    assert f"method.py:{marker_line(METHOD, 'EMA')}: copy of ddpm.EMA: ddpm.py not found" in out
    assert out.strip().endswith("0 copies checked, 0 drifted, 4 invalid markers")


def test_marker_without_definition_below_is_an_error(tmp_path, capsys):
    blank_line = replace_once(METHOD, "# Copied from ddpm.EMA\n", "# Copied from ddpm.EMA\n\n")
    statement = METHOD + "\n# Copied from ddpm.IMAGE_EXTENSIONS\nprint(IMAGE_EXTENSIONS)\n"
    end_of_file = METHOD + "\n# Copied from ddpm.EMA\n"
    cases = ((blank_line, "EMA"), (statement, "IMAGE_EXTENSIONS"), (end_of_file, "EMA"))
    for method, name in cases:
        write_repo(tmp_path, method)
        assert main([], root=tmp_path) == 1
        marker = f"# Copied from ddpm.{name}"
        line = max(i for i, text in enumerate(method.split("\n"), 1) if text == marker)
        expected = f"method.py:{line}: marker for ddpm.{name} is not directly above a class"
        assert expected in capsys.readouterr().out


def test_malformed_marker_is_an_error(tmp_path, capsys):
    markers = (
        "# Copied from patch_ddpm.EMA",
        "# Copied from ddpm.EMA with EMA=>Average",
        "# Copied from ddpm",
    )
    for marker in markers:
        method = replace_once(METHOD, "# Copied from ddpm.EMA\n", marker + "\n")
        write_repo(tmp_path, method)
        assert main([], root=tmp_path) == 1
        line = method.split("\n").index(marker) + 1
        assert f'method.py:{line}: malformed marker "{marker}"' in capsys.readouterr().out


def test_copy_at_another_indentation_is_reindented(tmp_path, capsys):
    nested = (
        "\n\nclass Outer:\n    class Inner:\n        # Copied from ddpm.UNet.forward\n"
        "        def forward(self, x):\n            # (B, C, H, W) -> (B, C, H, W)\n"
        "            return x * self.channels\n"
    )
    path = write_repo(tmp_path, METHOD + nested)
    assert main([], root=tmp_path) == 0
    path.write_text(METHOD + nested.replace("x * self", "x / self"))
    assert main(["--fix"], root=tmp_path) == 0
    assert path.read_text() == METHOD + nested
    assert "5 copies checked, 1 drifted, 1 rewritten" in capsys.readouterr().out


def test_files_given_as_arguments_replace_the_default_set(tmp_path, capsys):
    write_repo(tmp_path, replace_once(METHOD, "x * self", "x - self"))
    other = tmp_path / "elsewhere" / "script.py"
    other.parent.mkdir()
    other.write_text("# Copied from ddpm.EMA with EMA->Average\nclass Average:\n    pass\n")
    assert main([str(other)], root=tmp_path) == 1
    out = capsys.readouterr().out
    assert "elsewhere/script.py:1: copy of ddpm.EMA differs from its source" in out
    assert "method.py" not in out
    assert out.strip().endswith("1 copies checked, 1 drifted")


if __name__ == "__main__":
    sys.exit(main())
