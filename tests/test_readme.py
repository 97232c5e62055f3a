"""The README and the docs stay true: the example runs, the two commands are dev.sh's, the links
resolve inside the repository, the headline numbers are in the files they link, and no page tells
the story of its own development."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", ROOT / "examples" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
TWO_COMMANDS = ("./dev.sh bench", "./dev.sh test")


def code_blocks(text: str, language: str):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def dev_sh_case(command: str) -> str:
    """The body of ``command)`` in dev.sh's ``case``, up to its ``;;``."""
    text = (ROOT / "dev.sh").read_text()
    match = re.search(rf"^\s*{command}\)(.*?);;", text, re.S | re.M)
    assert match, f"dev.sh has no '{command})' case"
    return match.group(1)


def test_readme_is_short():
    assert len(README.read_bytes()) <= 8192


def test_readme_example_runs(tmp_path):
    (example,) = code_blocks(README.read_text(), "python")
    script = tmp_path / "readme_example.py"
    script.write_text(example)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"balanced accuracy \d\.\d{3}", done.stdout), done.stdout


def test_readme_gives_exactly_the_two_commands_dev_sh_implements():
    blocks = code_blocks(README.read_text(), "bash")
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
                if line.strip().startswith("./dev.sh")]
    assert commands == list(TWO_COMMANDS)
    assert "python -m gala_kernels bench" in dev_sh_case("bench")
    test_case = dev_sh_case("test")
    assert "ruff check" in test_case and "python -m pytest" in test_case


def test_the_main_job_runs():
    """What ``./dev.sh bench`` runs, as dev.sh spells it, on a tiny dry run."""
    line = next(line.strip() for line in dev_sh_case("bench").split(";") if "gala_kernels bench" in line)
    command = line.replace('"$@"', "").split()
    assert command[:4] == ["python", "-m", "gala_kernels", "bench"]
    tiny = ["--dry-run", "--no-progress", "--implementations", "copy_floor,eager,fused_cpu"]
    done = subprocess.run([sys.executable, *command[1:], *tiny], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Headline" in done.stdout


def links(page: Path):
    return re.findall(r"\]\(([^)\s]+)\)", page.read_text())


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(page):
    assert page.exists()
    for target in links(page):
        assert not target.startswith(("http://", "https://", "/")), f"{page.name} links outside: {target}"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", resolved.read_text(), re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: no heading for #{anchor}"


def measured_rows(page: Path):
    """``(row, result file)`` for every table row that cites a file of bench/results (a row whose
    last cell is "same" cites the file of the row above)."""
    cited = None
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            cited = None
            continue
        targets = re.findall(r"\]\(([^)]*bench/results/[^)]+)\)", line)
        if targets:
            cited = (page.parent / targets[-1]).resolve()
        elif line.rstrip(" |").endswith("same") and cited is not None:
            pass
        else:
            continue
        yield line, cited


def test_readme_headline_cites_result_files():
    assert len(list(measured_rows(README))) >= 5


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_measured_numbers_are_in_the_files_they_cite(page):
    for row, cited in measured_rows(page):
        source = cited.read_text()
        text = re.sub(r"\[[^\]]*\]\([^)]*\)", "", row)  # the link itself is not a measurement
        for number in re.findall(r"\d[\d,]*\.\d+", text):
            assert number in source, f"{number} of {page.name} row {row!r} is not in {cited.name}"


HISTORY = [
    (r"\b20\d\d-\d\d-\d\d\b", "a date"),
    (r"\bsession", "a session"),
    (r"\bissue \d", "an issue number"),
    (r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", "a commit hash"),
    (r"\bearlier attempt|\bfirst version\b", "a story"),
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_tell_no_development_history(page):
    text = page.read_text()
    for pattern, what in HISTORY:
        match = re.search(pattern, text, re.I)
        assert match is None, f"{page.name} holds {what}: {match.group(0)!r}"


SOURCE_DIRS = ("csrc", "gala_kernels", "tools", "examples", "tests")
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".txt", ".cmake", ".toml"}
# a hexadecimal word not part of a number literal (1.4426950408889634f is a float, not a commit)
COMMIT_HASH = r"(?<![\w.])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w.])"


def source_files():
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file() and path.name != Path(__file__).name:
                yield path
    yield from (ROOT / name for name in ("setup.py", "CMakeLists.txt", "dev.sh", "pyproject.toml")
                if (ROOT / name).exists())


def test_code_tells_no_development_history():
    """Comments and docstrings explain the code as it is: no dates (they belong to the generated
    result files, with the machine), sessions, issue numbers or commit hashes."""
    patterns = [(COMMIT_HASH, what) if what == "a commit hash" else (pattern, what)
                for pattern, what in HISTORY]
    found = []
    for path in source_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern, what in patterns:
                match = re.search(pattern, line, re.I)
                if match:
                    found.append(f"{path.relative_to(ROOT)}:{number} holds {what}: {match.group(0)!r}")
    assert not found, "\n".join(found)
