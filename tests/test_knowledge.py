"""The local document index behind `lookup`: right passage first, with sources, never a crash."""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path

import pytest

from livecall.agent.knowledge import KnowledgeBase, fts_query, split_passages

HOURS_MD = """\
# Rosa's Pizzeria

Family-run pizzeria in Springfield since 1998.

## Opening hours

We are open Monday to Friday from 11am to 10pm, and on Saturday and Sunday from
noon to 11pm. The kitchen closes thirty minutes before closing time.

## Parking

Free parking is available behind the building; enter from Elm Street.
"""

MENU_TXT = """\
Margherita pizza: 12 dollars. Tomato, mozzarella, basil.

Pepperoni pizza: 14 dollars.

Gluten-free bases are available for 3 dollars extra.
"""


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF (Helvetica text, one line per string) with a correct xref table."""

    def esc(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    font_id = 3 + 2 * len(pages)
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        (
            "<< /Type /Pages /Kids ["
            + " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
            + f"] /Count {len(pages)} >>"
        ).encode(),
    ]
    for i, lines in enumerate(pages):
        objects.append(
            (
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                f"/Resources << /Font << /F1 {font_id} 0 R >> >> /Contents {4 + 2 * i} 0 R >>"
            ).encode()
        )
        text = " T* ".join(f"({esc(line)}) Tj" for line in lines)
        stream = f"BT /F1 11 Tf 14 TL 72 720 Td {text} ET".encode()
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")

    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "hours.md").write_text(HOURS_MD)
    (folder / "menu.txt").write_text(MENU_TXT)
    (folder / "policies").mkdir()
    (folder / "policies" / "terms.pdf").write_bytes(
        make_pdf(
            [
                ["Refunds", "Orders can be refunded within 24 hours if the food arrived cold."],
                [
                    "Delivery",
                    "We deliver within five miles of Springfield town hall.",
                    "Delivery costs 4 dollars; free above 30 dollars.",
                ],
            ]
        )
    )
    (folder / ".hidden.md").write_text("secret hours of the hidden club")
    (folder / "image.png").write_bytes(b"\x89PNG not text")
    return folder


def test_top_passages_and_sources(docs: Path) -> None:
    kb = KnowledgeBase(docs)
    hits = kb.search("When are you open on Saturday?")
    assert hits[0].source == "hours.md" and hits[0].heading == "Opening hours"
    assert "Saturday and Sunday" in hits[0].text
    assert hits[0].citation == "hours.md › Opening hours"
    assert hits[0].score > 0 and all(a.score >= b.score for a, b in pairwise(hits))

    (hit,) = kb.search("how much is a margherita?", k=1)
    assert hit.source == "menu.txt" and "12 dollars" in hit.text and hit.heading is None

    delivery = kb.search("do you deliver to my area")[0]
    assert delivery.source == "policies/terms.pdf" and delivery.page == 2
    assert "five miles" in delivery.text
    assert delivery.citation == "policies/terms.pdf, page 2"
    assert delivery.as_dict()["source"] == "policies/terms.pdf, page 2"

    assert kb.search("where can I park")[0].heading == "Parking"
    assert kb.search("refund cold food")[0].page == 1
    assert not any(h.source.startswith(".") for h in kb.search("hidden club secret"))
    assert kb.search("xylophone quantum") == []


async def test_asearch_runs_off_the_loop(docs: Path) -> None:
    kb = KnowledgeBase(docs)
    hits = await kb.asearch("gluten free", k=2)
    assert hits[0].source == "menu.txt"
    assert len(hits) <= 2


def test_incremental_reindex(docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = tmp_path / "index.sqlite"
    kb = KnowledgeBase(docs, index_path=index, check_interval_s=3600)
    first = kb.refresh()
    assert (first.added, first.updated, first.removed) == (3, 0, 0)
    assert kb.refresh().unchanged == 3 and not kb.refresh().changed

    menu = docs / "menu.txt"
    menu.write_text("Calzone: 15 dollars, folded pizza with ricotta.\n")
    st = menu.stat()
    os.utime(menu, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    (docs / "hours.md").unlink()
    (docs / "allergens.md").write_text("# Allergens\n\nOur pesto contains pine nuts.\n")
    stats = kb.refresh()
    assert (stats.added, stats.updated, stats.removed, stats.unchanged) == (1, 1, 1, 1)
    assert kb.search("calzone")[0].source == "menu.txt"
    assert kb.search("margherita") == []
    assert all(h.source != "hours.md" for h in kb.search("opening hours saturday"))
    assert kb.search("nuts")[0].heading == "Allergens"
    kb.close()

    # A new process with the same index reads nothing that has not changed.
    def no_reading(self: KnowledgeBase, rel: str) -> list:
        raise AssertionError(f"re-read {rel}")

    monkeypatch.setattr(KnowledgeBase, "_read", no_reading)
    again = KnowledgeBase(docs, index_path=index)
    assert again.refresh().unchanged == 3
    assert again.search("pine nuts")[0].source == "allergens.md"
    again.close()


def test_search_picks_up_new_files_after_the_interval(docs: Path) -> None:
    kb = KnowledgeBase(docs, check_interval_s=0)
    assert kb.search("tiramisu") == []
    (docs / "desserts.md").write_text("Tiramisu is 6 dollars.")
    assert kb.search("tiramisu")[0].source == "desserts.md"


@pytest.mark.parametrize(
    "query",
    [
        '"',
        'hours" OR "x',
        "AND",
        "OR OR NOT",
        "NEAR(hours parking, 3)",
        "*",
        "hour*",
        "-parking",
        "text:hours",
        "heading:Parking",
        "(((",
        "^open",
        "'; DROP TABLE passages; --",
        "",
        "   \n\t ",
        "¿Cuándo abren? café Öffnungszeiten 営業時間 🍕",
        "open " * 5000,
        "\x00\x01 hours",
    ],
)
def test_hostile_queries_never_raise(docs: Path, query: str) -> None:
    kb = KnowledgeBase(docs)
    hits = kb.search(query)
    assert isinstance(hits, list) and len(hits) <= 3
    assert len(kb) > 0  # the table survived


def test_query_is_quoted_terms() -> None:
    assert fts_query('opening "hours" NEAR(x)') == '"opening" OR "hours" OR "near" OR "x"'
    assert fts_query("what are your") == '"what" OR "are" OR "your"'  # all stopwords: keep them
    assert fts_query("?!") is None


def test_broken_files_are_skipped(docs: Path) -> None:
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "latin1.txt").write_bytes("Caf\xe9 open late on Fridays".encode("latin-1"))
    kb = KnowledgeBase(docs)
    assert kb.refresh().added == 5
    assert kb.search("fridays late")[0].source == "latin1.txt"


def test_missing_folder_is_empty_not_an_error(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path / "nope")
    assert kb.search("anything") == [] and len(kb) == 0


def test_passages_split_on_paragraphs_within_bounds() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * (20 + 15 * (i % 4)) for i in range(30)]
    text = "# Title\n\n" + "\n\n".join(paragraphs) + "\n\n" + "Long sentence. " * 200
    passages = split_passages(text, markdown=True)
    assert all(heading == "Title" for heading, _ in passages)
    assert all(len(body) <= 800 for _, body in passages)
    assert sum(1 for _, body in passages if len(body) >= 400) >= len(passages) - 3
    for _, body in passages[:5]:  # paragraphs are never cut in the middle
        for chunk in body.split("\n\n"):
            assert chunk.startswith("Paragraph ")


def test_markdown_headings_start_new_passages() -> None:
    passages = split_passages("intro\n# A\nalpha text\n\n## B\nbeta text", markdown=True)
    assert passages == [(None, "intro"), ("A", "alpha text"), ("B", "beta text")]
