"""The fenced code blocks of README.md and docs/**/*.md, parsed once for every doc test.

A block is ```LANG ... ``` (or ~~~); its language decides which test executes it (tests/test_docs_shell.py
checks that every block has a language some test runs). Shell blocks are split into commands: lines
joined at a trailing backslash, comments dropped, and a comment line `# -> TEXT` right after a command is
a line its output must contain (`PORT` stands for any port)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def docs() -> list[Path]:
    """README.md and every Markdown file under docs/ (the generated references included)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    doc: str            # path relative to the repository root
    line: int           # 1-based line of the opening fence
    lang: str           # "" when the fence names none
    text: str
    after_block: bool   # only blank lines separate it from the previous block (an output block)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i, last_end = 0, None
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, start = len(m["indent"]), m["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        gap = lines[last_end + 1:start] if last_end is not None else ["x"]
        out.append(Block(rel(path), start + 1, m["info"].lower(), "\n".join(body) + "\n",
                         after_block=all(not g.strip() for g in gap)))
        last_end = i
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in docs() for b in blocks(doc)]


def python_blocks(doc: str) -> list[str]:
    """The source of every ```python block of `doc` (a path relative to the repository root)."""
    return [b.text for b in blocks(ROOT / doc) if b.lang == "python"]


@dataclass
class Command:
    block: Block
    line: int                                         # 1-based line in the doc
    text: str                                         # as written, comments dropped, continuations joined
    expect: list[str] = field(default_factory=list)   # lines its output must contain (`# -> ...`)
    output: str | None = None                         # the whole output, when an output block follows

    @property
    def where(self) -> str:
        return f"{self.block.doc}:{self.line}"


def strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a # outside quotes, at the start or after a blank)."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def commands(block: Block) -> list[Command]:
    """The commands of a shell block, in order."""
    out: list[Command] = []
    raw = block.text.splitlines()
    i = 0
    while i < len(raw):
        line, n = raw[i], i
        i += 1
        if block.lang == "console":
            if line.startswith("$ "):
                out.append(Command(block, block.line + 1 + n, line[2:].strip()))
            elif line.strip() and out:
                out[-1].expect.append(line.strip())
            continue
        while line.endswith("\\") and i < len(raw):
            line = line[:-1] + " " + raw[i].strip()
            i += 1
        stripped = line.strip()
        if stripped.startswith("# ->"):
            assert out, f"{block.where}: an expected-output line before any command"
            out[-1].expect.append(stripped[4:].strip())
            continue
        text = strip_comment(stripped)
        if text:
            out.append(Command(block, block.line + 1 + n, re.sub(r"\s+", " ", text)))
    return out


def expect_pattern(text: str) -> re.Pattern:
    """An expected-output line as a regex: ports (`PORT`, or the number after `HOST:`) match any port."""
    pattern = re.escape(text).replace("PORT", r"\d+")
    pattern = re.sub(r"((?:127\\\.0\\\.0\\\.1|localhost|0\\\.0\\\.0\\\.0):)\d+", r"\1\\d+", pattern)
    return re.compile(pattern)
