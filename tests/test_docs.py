"""The README stays a short user's manual, and the README and docs/ do not rot: every relative link
resolves (anchors included), and every command that runs one of the project's scripts uses only
flags that the script's `--help` lists."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300
MAX_PICTURE_BYTES = 200_000

TRAIN_SCRIPT = "train_textual_inversion_infinity.py"
# The project's scripts, by how a command names them: a path relative to the repository root, or a
# module run with `python -m`.
SCRIPTS = sorted(
    [TRAIN_SCRIPT, "infer_textual_inversion.py", "examples/pretrain_toy_infinity.py"]
    + [p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.py")]
)
MODULES = ["toy_infinity.world", "toy_infinity.recogniser"]
# A flag whose value holds another script's flags: bench_toy_fidelity.py --setting NAME="FLAGS" runs
# the training script with FLAGS.
FORWARDED = {("benchmarks/bench_toy_fidelity.py", "--setting"): TRAIN_SCRIPT}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<"}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HTML_LINK = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")
OPTION_LINE = re.compile(r"^  (-\S.*?)(?: {2,}|$)", re.MULTILINE)  # an option's names in argparse's --help


# --- reading markdown ---------------------------------------------------------------------------


def split_fences(text: str) -> tuple[list[tuple[str, str]], str]:
    """The fenced code blocks (language, body) and the text with them blanked out (lines kept)."""
    blocks = [(m.group(1).strip().lower(), m.group(2)) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return blocks, prose


def without_code_spans(prose: str) -> str:
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)


def code_snippets(text: str) -> list[str]:
    """Every piece of code a reader might run: the commands of fenced blocks (a trailing backslash
    continues a line) and inline code spans (which may wrap over lines)."""
    blocks, prose = split_fences(text)
    snippets = []
    for language, body in blocks:
        if language in ("python", "py", "json", "jsonl", "toml", "yaml", "text"):
            continue
        snippets += re.sub(r"\\[ \t]*\n", " ", body).splitlines()
    snippets += [" ".join(m.group(2).split()) for m in CODE_SPAN.finditer(prose)]
    return [s.strip() for s in snippets if s.strip()]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text (code and link text kept), lowercased, punctuation
    other than hyphens and underscores dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The ids of a page's headings (a repeated heading's get -1, -2, ...)."""
    _, prose = split_fences(text)
    seen: dict[str, int] = {}
    ids = set()
    for m in HEADING.finditer(prose):
        anchor = github_anchor(m.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        ids.add(anchor if count == 0 else f"{anchor}-{count}")
    return ids


def link_targets(text: str) -> list[str]:
    _, prose = split_fences(text)
    prose = without_code_spans(prose)
    return [m.group(1) for pattern in (LINK, REFERENCE_LINK, HTML_LINK) for m in pattern.finditer(prose)]


def broken_links(page: Path, text: str) -> list[str]:
    problems = []
    for target in link_targets(text):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of the project
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            problems.append(f"{target}: no file {path}")
            continue
        if not anchor or path.suffix != ".md":
            continue
        if anchor not in anchors(text if path == page else path.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    return problems


# --- commands and flags -------------------------------------------------------------------------


def script_of(tokens: list[str], i: int) -> str | None:
    """The script that token i names (with the tokens before it), if it is one of the project's."""
    token = tokens[i]
    if i > 0 and tokens[i - 1] == "-m" and token in MODULES:
        return token
    if token.endswith(".py"):
        for script in SCRIPTS:
            if token == script or token == script.rsplit("/", 1)[-1] or token.endswith("/" + script):
                return script
    return None


def script_calls(snippet: str) -> list[tuple[str, list[str]]]:
    """(script, the arguments after the script's name) for each call of a project script in a snippet.
    Flags before the script's name are the launcher's (accelerate launch, torchrun, python)."""
    lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    calls = []
    i = 0
    while i < len(tokens):
        script = script_of(tokens, i)
        if script is None:
            i += 1
            continue
        end = i + 1
        while end < len(tokens) and tokens[end] not in SHELL_OPERATORS:
            end += 1
        calls.append((script, tokens[i + 1 : end]))
        i = end
    return calls


def unknown_flags(script: str, args: list[str], flags_of: dict[str, set[str]]) -> list[str]:
    unknown = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        if flag not in flags_of[script]:
            unknown.append(f"{flag} (not in `{script} --help`)")
        forwarded_to = FORWARDED.get((script, flag))
        if forwarded_to and i + 1 < len(args) and "=" in args[i + 1]:
            inner = args[i + 1].split("=", 1)[1]
            unknown += unknown_flags(forwarded_to, shlex.split(inner), flags_of)
    return unknown


def help_flags(script: str) -> set[str]:
    """The flags the script's --help lists: its usage block, and each option's names (aliases too)."""
    command = [sys.executable, "-m", script] if script in MODULES else [sys.executable, script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [*command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-2000:]}"
    usage = result.stdout.split("\n\n", 1)[0]
    assert usage.startswith("usage:"), f"{script} --help does not start with an argparse usage:\n{usage}"
    # Aliases (--cfg CFG, --guidance_scale CFG) are listed only where each option is described.
    invocations = [m.group(1) for m in OPTION_LINE.finditer(result.stdout)]
    return {"--help", *FLAG.findall(usage), *(f for line in invocations for f in FLAG.findall(line))}


def page_calls(text: str) -> list[tuple[str, str, list[str]]]:
    """(the snippet, script, args) for every script call in a page; a snippet that names a project
    script must parse as shell words."""
    calls = []
    for snippet in code_snippets(text):
        if not any(s.rsplit("/", 1)[-1] in snippet for s in SCRIPTS + MODULES):
            continue
        try:
            found = script_calls(snippet)
        except ValueError as e:
            raise AssertionError(f"cannot read as a shell command ({e}): {snippet}") from e
        calls += [(snippet, script, args) for script, args in found]
    return calls


@pytest.fixture(scope="module")
def flags_of() -> dict[str, set[str]]:
    """Each script's flags, from one --help call (run in parallel) per script that a page runs, that
    docs/flags.md's tables describe or that the self-test uses."""
    needed = {TRAIN_SCRIPT, "infer_textual_inversion.py", "benchmarks/bench_toy_fidelity.py", "toy_infinity.world"}
    for page in PAGES:
        for _, script, _ in page_calls(page.read_text(encoding="utf-8")):
            needed.add(script)
            needed.update(target for (source, _), target in FORWARDED.items() if source == script)
    needed = sorted(needed)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(needed, pool.map(help_flags, needed)))


def flag_problems(text: str, flags_of: dict[str, set[str]]) -> list[str]:
    problems = []
    for snippet, script, args in page_calls(text):
        problems += [f"{flag} in: {snippet}" for flag in unknown_flags(script, args, flags_of)]
    return problems


# --- the tests ----------------------------------------------------------------------------------


def test_the_readme_is_a_short_manual():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, at most {MAX_README_LINES}: move measurements and analyses to docs/"
    )
    blocks, _ = split_fences("\n".join(lines) + "\n")
    assert any("pytest" in body.splitlines() for _, body in blocks), "the README's test command is `pytest` (CI)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    problems = broken_links(page, page.read_text(encoding="utf-8"))
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_doc_is_linked_from_the_readme():
    targets = {(ROOT / t.partition("#")[0]).resolve() for t in link_targets(README.read_text(encoding="utf-8"))}
    assert [p.name for p in PAGES[1:] if p.resolve() not in targets] == []


def test_pictures_stay_small():
    pictures = [p for p in (ROOT / "docs").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif")]
    assert [f"{p.name}: {p.stat().st_size} bytes" for p in pictures if p.stat().st_size > MAX_PICTURE_BYTES] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_commands_use_only_flags_the_scripts_have(page, flags_of):
    problems = flag_problems(page.read_text(encoding="utf-8"), flags_of)
    assert not problems, "flags the scripts do not have:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("section", "script"), [("Training flags", TRAIN_SCRIPT), ("Inference flags", "infer_textual_inversion.py")]
)
def test_the_full_flag_tables_name_real_flags(section, script, flags_of):
    """docs/flags.md's tables: the flags a row's first cell names are the script's."""
    text = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    table = text.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    named = [f for row in table.splitlines() if row.startswith("| `") for f in FLAG.findall(row.split(" | ")[0])]
    assert named, f"no table under ### {section} in docs/flags.md"
    unknown = sorted({f for f in named if not f.endswith("-")} - flags_of[script])
    assert not unknown, f"docs/flags.md, {section}: not in `{script} --help`: {', '.join(unknown)}"


def test_the_checks_catch_a_made_up_flag_and_a_broken_link(flags_of):
    """The checks can fail: a made-up flag in a multi-line command, in a forwarded --setting and in an
    inline span, and links to a missing file and a missing heading."""
    page = """
## A heading

```bash
accelerate launch --num_processes 1 train_textual_inversion_infinity.py \\
  --placeholder_token "<x>" --made_up_flag 3
```

Reproduce: `python benchmarks/bench_toy_fidelity.py --setting a="--train_scales all --made_up_train_flag"
--seeds 0`, then `python -m toy_infinity.world --out DIR --made_up_world_flag`.
[a](docs/missing.md), [b](#a-heading), [c](#no-such-heading), `[not a link](missing.md)`.
"""
    problems = flag_problems(page, flags_of)
    assert [p.split(" ", 1)[0] for p in problems] == ["--made_up_flag", "--made_up_train_flag", "--made_up_world_flag"]
    assert len(broken_links(README, page)) == 2
