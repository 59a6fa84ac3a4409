"""docs/troubleshooting.md quotes only messages that the code really raises, and covers upstream Mooncake's
PG/EP troubleshooting guide's topics.

Convention (stated at the top of the guide): in every Markdown table whose first header cell is ``Message``,
the first cell of each row is one code span holding a message exactly as the code raises it, where ``…``
stands for a value filled in at run time; a quote may be any contiguous part of a message.

The check: every string literal of the ``mooncake`` package is rendered as a template (f-string fields become
``…``; adjacent literals are one string, as Python joins them), and each quote must be a substring of one
template.  So the text between the ``…`` is verbatim, and every ``…`` sits where the code inserts a value.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GUIDE = REPO_ROOT / "docs" / "troubleshooting.md"
PACKAGE = REPO_ROOT / "mooncake"
NOT_MESSAGES = {PACKAGE / "doctor.py"}  # the doctor's own texts are advice, not errors the library raises
HOLE = "…"

# The topics of upstream Mooncake's PG/EP troubleshooting guide, by heading.
SEED_TOPICS = [
    "Import fails with a PyTorch version error",
    "`activeRanks must be int` or device mismatch",
    "`dist.get_world_size()` is smaller than `max_world_size`",
    "`get_peer_state()` or `join_group()` hangs",
    "Newly extended ranks participate too early",
    "EP dispatch/combine timeout marks a rank inactive",
    "EP falls back instead of using the fast path",
    "RDMA connection errors or severe latency from wrong HCA selection",
    "EP output mismatch or buffer overflow symptoms",
    "P2P send/recv errors",
    "Useful smoke commands",
    "What to include in bug reports",
]

_CODE_SPAN = re.compile(r"``\s?(.+?)\s?``|`([^`]+)`")


def _cells(line: str) -> list[str]:
    body = line.strip().strip("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def tables(text: str, first_header: str) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of every body row of the tables whose first header cell is ``first_header``."""
    rows, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and _cells(lines[i])[0] == first_header:
            i += 2  # header and separator
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append((i + 1, _cells(lines[i])))
                i += 1
        else:
            i += 1
    return rows


def quoted_messages(text: str) -> list[tuple[int, str]]:
    out = []
    for lineno, cells in tables(text, "Message"):
        spans = [a or b for a, b in _CODE_SPAN.findall(cells[0])]
        assert len(spans) == 1, f"troubleshooting.md:{lineno}: the Message cell must be one code span: {cells[0]!r}"
        out.append((lineno, spans[0]))
    return out


def _render(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:  # FormattedValue: a value filled in at run time
                parts.append(HOLE)
        return "".join(parts)
    return None


def source_templates() -> list[tuple[str, str]]:
    """``(file, template)`` for every string literal and f-string in the package (nested f-strings included)."""
    templates = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in NOT_MESSAGES:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            text = _render(node)
            if text:
                templates.append((str(path.relative_to(REPO_ROOT)), text))
    return templates


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text()


@pytest.fixture(scope="module")
def templates() -> list[tuple[str, str]]:
    return source_templates()


def test_convention_is_stated(guide):
    assert "`…` stands for a value filled in at run time" in guide
    assert "tests/docs/test_troubleshooting.py" in guide


def test_guide_quotes_many_messages(guide):
    # the extractor must find the tables; a formatting slip must not silently test nothing
    assert len(quoted_messages(guide)) >= 50


def test_every_quoted_message_exists_in_the_source(guide, templates):
    missing = []
    for lineno, message in quoted_messages(guide):
        if not any(message in text for _, text in templates):
            near = [f"{f}: {t!r}" for f, t in templates if message.split(HOLE)[0].strip() and
                    message.split(HOLE)[0].strip()[:25] in t][:3]
            missing.append(f"troubleshooting.md:{lineno}: {message!r} is not in mooncake/"
                           + (f" (similar: {'; '.join(near)})" if near else ""))
    assert not missing, "\n".join(missing)


def test_quotes_are_not_just_placeholders(guide):
    for lineno, message in quoted_messages(guide):
        literal = message.replace(HOLE, "").strip(" .,:;()[]")
        assert len(literal) >= 12, f"troubleshooting.md:{lineno}: {message!r} says too little to search for"


def test_every_seed_topic_has_a_section(guide):
    headings = [line[3:].strip() for line in guide.splitlines() if line.startswith("## ")]
    missing = [topic for topic in SEED_TOPICS if topic not in headings]
    assert not missing, f"sections missing for seed topics: {missing}; headings: {headings}"


def test_doctor_lines_named_in_the_guide_exist(guide):
    """The guide's table of doctor lines names only checks the doctor can print."""
    tree = ast.parse((PACKAGE / "doctor.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Check" and node.args:
            text = _render(node.args[0])
            if text:
                names.add(text)
    patterns = [re.compile(re.escape(n).replace(re.escape(HOLE), r"[a-z]+") + "$") for n in names]
    rows = tables(guide, "Doctor line")
    assert rows, "the guide has no table of doctor lines"
    listed = [span for _, cells in rows for a, b in _CODE_SPAN.findall(cells[0]) for span in [a or b]]
    unknown = [n for n in listed if not any(p.match(n) for p in patterns)]
    assert not unknown, f"doctor lines the doctor never prints: {unknown} (it prints {sorted(names)})"
    covered = [n for n in names if not any(re.fullmatch(re.escape(n).replace(re.escape(HOLE), r"[a-z]+"), x)
                                           for x in listed)]
    assert not covered, f"doctor lines missing from the guide's table: {covered}"


def test_relative_links_and_paths_exist(guide):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", guide):
        assert (GUIDE.parent / target).exists(), f"broken link: {target}"
    for path in ("notebooks/ep_dispatch_combine.ipynb", "notebooks/fault_tolerant_pg.ipynb", "tests/ep/run_cuda.sh",
                 "tests/pg", "tests/ep", "tests/ft"):
        assert path in guide and (REPO_ROOT / path).exists(), path


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def test_anchors_point_at_headings(guide):
    slugs = {_slug(line.lstrip("#").strip()) for line in guide.splitlines() if line.startswith("#")}
    for anchor in re.findall(r"\]\(#([^)]+)\)", guide):
        assert anchor in slugs, f"link to #{anchor}, which is no heading of the guide"


# What a user of the fault-tolerance and elastic API meets; each must be quoted in a Message table (so it is also
# checked against the source by test_every_quoted_message_exists_in_the_source).
FT_MESSAGES = [
    "joinGroup is only valid for extension backends",
    "has not called join_group",
    "already running",
    "was not admitted within",
    "was removed from the group",
    "did not complete within",
    "agreed on it",
    "could not reach the Store",
    "Size out of range",
    "newSize < oldSize",
    "must be called at an op boundary",
    "failure_mode must be",
]


def test_fault_tolerance_messages_are_covered(guide):
    quotes = [message for _, message in quoted_messages(guide)]
    missing = [m for m in FT_MESSAGES if not any(m in q for q in quotes)]
    assert not missing, f"fault-tolerance messages not quoted in a Message table: {missing}"


def test_fault_tolerance_topics(guide):
    headings = [line[3:].strip() for line in guide.splitlines() if line.startswith("## ")]
    assert "The Store's host died" in headings
    assert any("UCX_LOG_LEVEL" in h for h in headings)
    for word in ('failure_mode="complete"', 'failure_mode="raise"', "is_extension=True", "recover_ranks",
                 "get_peer_state", "join_group", "extend_group_size_to"):
        assert word in guide, word


def test_ucx_log_level_claim_matches_the_code(monkeypatch):
    """The guide says: UCX's log level is 'fatal' unless UCX_LOG_LEVEL is set, and UCX_NET_DEVICES wins over
    the devices mooncake derives."""
    ucx = pytest.importorskip("mooncake.ref.ucx")
    monkeypatch.delenv("UCX_LOG_LEVEL", raising=False)
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    config = ucx._ucx_config("lo")
    assert config.get("LOG_LEVEL") == "fatal" and config.get("NET_DEVICES") == "lo"
    monkeypatch.setenv("UCX_LOG_LEVEL", "info")
    monkeypatch.setenv("UCX_NET_DEVICES", "eth0")
    config = ucx._ucx_config("lo")
    assert "LOG_LEVEL" not in config and "NET_DEVICES" not in config


def test_renderer_sees_fstrings_and_joined_literals():
    """The matching rule itself: holes for fields, adjacent literals joined, nested f-strings found."""
    code = ('x = 3\nraise ValueError(f"a {x!r} b" "c {d}" f"[{x:.2f}]")\n'
            'what = (f"inner {x} text" if x else "other")\n')
    rendered = {_render(n) for n in ast.walk(ast.parse(code))} - {None}
    assert "a … bc {d}[…]" in rendered
    assert "inner … text" in rendered and "other" in rendered
