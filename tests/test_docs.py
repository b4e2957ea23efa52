"""The README and docs/: links to files and headings that exist, and the NPU install line's pinned versions.

Anchors follow GitHub's heading slugs: the heading's text lowercased, every character that is not a letter, digit,
space, '-' or '_' dropped, spaces turned into '-'; the n-th repeat of a slug gets '-n'.
"""
import re

import pytest

from helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


FENCE = re.compile(r"^\s*(```|~~~)")


HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


INLINE_CODE = re.compile(r"`[^`]*`")


LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(text):
    """The lines outside fenced code blocks, with their numbers."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            yield number, line


def slug(heading):
    text = LINK.sub(r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen = {}
    for _, line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            seen.setdefault(base if count == 0 else f"{base}-{count}", 1)
    return set(seen)


def relative_links(path):
    """(line number, target) of each link that is not to another site."""
    for number, line in prose_lines(path.read_text()):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(2)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                yield number, target


def broken_links(path):
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.name}:{number}: {target}: no file {linked}")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{path.name}:{number}: {target}: no heading #{anchor} in {linked.name}")
    return broken


def test_slugs_follow_github():
    assert slug("Benchmark (`bench.py`)") == "benchmark-benchpy"
    assert slug("Named weights (`torchvision`, `timm`)") == "named-weights-torchvision-timm"
    assert slug("Launchers (`test/`)") == "launchers-test"
    assert slug("Several nodes: torchrun, SLURM") == "several-nodes-torchrun-slurm"
    assert slug("snake_case and-dash") == "snake_case-and-dash"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Notes\n\n```bash\n# not a heading\n```\n\n## Notes\n")
    assert anchors(page) == {"notes", "notes-1", "notes-2"}


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#other-page) [fine](#page) [site](https://example.com/x.md)\n"
        "`[in code](missing.md)`\n\n[gone](missing.md) [no heading](other.md#nowhere) [here](#nowhere)\n")
    assert [entry.split(":")[1] for entry in broken_links(page)] == ["6", "6", "6"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert list(relative_links(page)) or page.name != "README.md", "the README links to its docs/ pages"
    assert broken_links(page) == []


def test_readme_is_short_and_docs_pages_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for name in ("speed", "reliability", "launchers", "recipes"):
        assert (ROOT / "docs" / f"{name}.md").exists(), name
    assert not re.search(r"this session|earlier run today|measured again", readme)


# --- installing on an NPU host ---

CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("page", ["requirements-npu.txt", "docs/devices.md"])
def test_the_npu_install_takes_torchs_cpu_build_at_the_pinned_versions(page):
    """PyPI's torch Linux wheels are CUDA builds with gigabytes of NVIDIA packages; torch_npu's README installs the
    CPU build from PyTorch's index first. The command must name requirements-npu.txt's own pins."""
    with open(f"{ROOT}/requirements-npu.txt") as handle:
        pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", handle.read(), re.M))
    with open(f"{ROOT}/{page}") as handle:
        commands = [line for line in handle.read().splitlines() if CPU_INDEX in line]
    assert commands, f"{page} does not say how to install torch's CPU build"
    for command in commands:
        assert f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']} {CPU_INDEX}" in command
        assert command.endswith("&& pip install -r requirements-npu.txt")
