"""The README and docs/ as a reader follows them: every relative link leads to a file of the
repository (and a `#section` to a heading of it), the layout page names every module, and the
README's command lines are lines of the command-line block that the CLI test runs.

Plain text checks, the same on every backend: each runs in one pass (`once`)."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*```.*?^\s*```[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]+`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _prose(text):
    """The text outside code: fenced blocks and inline code spans removed."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _links(path):
    return LINK.findall(_prose(path.read_text()))


def _slug(heading):
    """GitHub's anchor for a heading: link text kept, lower case, punctuation but `-` and `_`
    dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
    anchors, seen = set(), {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.once("jax")
def test_every_relative_link_leads_to_a_file_and_heading():
    checked, broken = 0, []
    for page in _pages():
        for target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            checked += 1
            if REPO not in where.parents and where != REPO:
                broken.append(f"{page.name}: {target} leaves the repository")
            elif not where.exists():
                broken.append(f"{page.name}: {target} (no {where.relative_to(REPO)})")
            elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
                broken.append(f"{page.name}: {target} (no heading #{anchor} in "
                              f"{where.relative_to(REPO)}: {sorted(_anchors(where))})")
    assert checked >= 50, checked  # the README and every docs page link somewhere
    assert not broken, "\n".join(broken)


@pytest.mark.once("jax")
def test_layout_page_names_every_module():
    layout = REPO / "docs" / "layout.md"
    linked = {(layout.parent / target.partition("#")[0]).resolve()
              for target in _links(layout)}
    modules = sorted((REPO / "gemma_keras").rglob("*.py"))
    assert len(modules) >= 50
    missing = [str(m.relative_to(REPO)) for m in modules if m not in linked]
    assert not missing, f"docs/layout.md does not name {missing}"


def _bash_blocks(text):
    """Each ```bash block's commands, trailing comments removed (as the CLI test reads them)."""
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
            for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)]


@pytest.mark.once("jax")
def test_readme_command_lines_are_lines_of_the_tested_cli_block():
    """The README shows a few command lines; tests/test_cli_and_guides.py runs every line of
    docs/cli.md's block as written, so each README line must be one of them."""
    readme = [line for block in _bash_blocks((REPO / "README.md").read_text())
              for line in block if line.split()[0] in ("gemma-keras", "echo")]
    cli = (REPO / "docs" / "cli.md").read_text()
    tested = _bash_blocks(cli[cli.index("# Command line"):])[0]  # the block the test runs
    assert len(readme) >= 2, readme
    assert not [line for line in readme if line not in tested], tested
