"""Finding calls by anything said in them, or by any part of a number.

Every searchable line of a call is a `SearchDoc` row (a transcript turn; a summary or an
extracted field once post-call analysis writes them: `analysis_docs` + `index_docs`, one call).
The rows are full-text indexed by migration 0005: SQLite's FTS5 (`search_fts`, kept in step by
triggers) and PostgreSQL's `to_tsvector('simple', text)` under a GIN index. 'simple' (no
stemming, no stop words) because what owners look for is names, streets and order numbers.

Numbers are matched by their digits, whatever the format: "(555) 010-2030", "5550102030" and
"2030" all find +15550102030. Calls keep their numbers' digits reversed, so "ends with" is
a prefix, and a prefix is a range an ordinary index answers on both databases.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Integer, and_, func, literal_column, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from livecall.store.models import Call, SearchDoc

__all__ = [
    "INDEX_NAMES",
    "MIN_NUMBER_DIGITS",
    "SearchHit",
    "analysis_docs",
    "digits",
    "fts5_query",
    "highlight",
    "include_name",
    "index_docs",
    "looks_like_number",
    "number_suffix",
    "rdigits",
    "search_terms",
    "snippet",
    "text_matches",
    "tsquery",
    "turn_doc",
]

MIN_NUMBER_DIGITS = 3  # fewer digits than this match far too many numbers to be useful
MAX_TERMS = 8
# Database objects the full-text index adds outside the models: model comparisons skip them.
INDEX_NAMES = ("search_fts", "ix_search_docs_tsv")


def include_name(name: str | None, type_: str, parents: object) -> bool:
    """For Alembic: the full-text index lives outside the models (FTS5, an expression index)."""
    return not (name and name.startswith(INDEX_NAMES))


_NON_DIGIT = re.compile(r"\D+")
_NUMBER_CHARS = re.compile(r"^[\d\s()+.\-/]+$")
_TERM = re.compile(r"\w+", re.UNICODE)
_TS_CONFIG: ColumnElement[Any] = literal_column("'simple'::regconfig")


def digits(value: str | None) -> str:
    return _NON_DIGIT.sub("", value or "")


def rdigits(number: str | None) -> str | None:
    """A number's digits, last first (what `calls.*_rdigits` hold); None without digits."""
    found = digits(number)
    return found[::-1][:32] or None


def looks_like_number(query: str) -> bool:
    """A query made of digits and phone punctuation, with enough digits to mean something."""
    return bool(_NUMBER_CHARS.match(query)) and len(digits(query)) >= MIN_NUMBER_DIGITS


def number_suffix(query: str) -> ColumnElement[bool]:
    """Calls whose caller or called number ends with the query's digits."""
    wanted = digits(query)[::-1]
    upper = wanted + ":"  # ':' sorts right after '9': [wanted, upper) is "starts with"
    return or_(
        and_(Call.from_rdigits >= wanted, Call.from_rdigits < upper),
        and_(Call.to_rdigits >= wanted, Call.to_rdigits < upper),
    )


def search_terms(query: str) -> list[str]:
    """The words of a query, lower-cased, at most `MAX_TERMS` (everything else is dropped)."""
    return [t.lower() for t in _TERM.findall(query)][:MAX_TERMS]


def fts5_query(terms: Sequence[str]) -> str:
    """FTS5 MATCH syntax: every term, each as a quoted prefix (no operator injection)."""
    return " ".join(f'"{t}"*' for t in terms)


def tsquery(terms: Sequence[str]) -> str:
    """PostgreSQL to_tsquery syntax: every term, each as a prefix."""
    return " & ".join(f"{t}:*" for t in terms)


def turn_doc(call_sid: str, speaker: str, idx: int, words: str | None) -> dict[str, Any]:
    return {"call_sid": call_sid, "source": speaker, "ref": idx, "text": words or ""}


def analysis_docs(
    call_sid: str, summary: str | None, fields: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """A post-call analysis as searchable lines: its summary and each extracted field.

    Whoever stores an analysis indexes it with
    `await index_docs(session, analysis_docs(sid, summary, fields))`.
    """
    docs = []
    if summary:
        docs.append({"call_sid": call_sid, "source": "summary", "ref": 0, "text": summary})
    for name, value in (fields or {}).items():
        if value is None or value == "" or isinstance(value, dict | list):
            continue
        docs.append(
            {
                "call_sid": call_sid,
                "source": f"field:{str(name)[:56]}",
                "ref": 0,
                "text": f"{name}: {value}",
            }
        )
    return docs


async def index_docs(session: AsyncSession, docs: Iterable[Mapping[str, Any]]) -> None:
    """Adds or replaces searchable lines (keyed by call, source and ref) in `session`."""
    rows = {(d["call_sid"], d["source"], d["ref"]): dict(d) for d in docs}
    if not rows:
        return
    name = session.get_bind().dialect.name
    insert = postgresql.insert if name == "postgresql" else sqlite.insert
    stmt = insert(SearchDoc)
    stmt = stmt.on_conflict_do_update(
        index_elements=[SearchDoc.call_sid, SearchDoc.source, SearchDoc.ref],
        set_={"text": stmt.excluded.text},
    )
    await session.execute(stmt, list(rows.values()))


def text_matches(dialect: str, terms: Sequence[str]) -> ColumnElement[bool]:
    """The condition on `SearchDoc` for lines holding every term (as a word prefix)."""
    if dialect == "postgresql":
        vector = func.to_tsvector(_TS_CONFIG, SearchDoc.text)  # the GIN index's expression
        return vector.op("@@")(func.to_tsquery(_TS_CONFIG, tsquery(terms)))
    matching = (
        text("SELECT rowid AS id FROM search_fts WHERE search_fts MATCH :q")
        .bindparams(q=fts5_query(terms))
        .columns(id=Integer)
        .subquery()
    )
    return SearchDoc.id.in_(select(matching.c.id))


@dataclass(slots=True)
class SearchHit:
    """A call that matched, and its first matching line."""

    call: Call
    source: str | None = None  # caller | agent | summary | field:<name>; None for a number
    ref: int | None = None
    text: str | None = None
    matches: int = 0  # lines that matched


def snippet(line: str, terms: Sequence[str], width: int = 160) -> str:
    """The part of a long line around its first match, with … where it was cut."""
    if len(line) <= width:
        return line
    lowered = line.lower()
    at = min((i for t in terms if (i := lowered.find(t)) >= 0), default=0)
    start = max(0, at - width // 3)
    end = min(len(line), start + width)
    start = max(0, end - width)
    return ("…" if start else "") + line[start:end].strip() + ("…" if end < len(line) else "")


def highlight(line: str, terms: Sequence[str]) -> list[tuple[str, bool]]:
    """`line` cut into (text, is_match) pieces: words that start with a search term match."""
    if not terms:
        return [(line, False)]
    pattern = re.compile(
        r"\b(?:" + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)) + r")\w*",
        re.IGNORECASE | re.UNICODE,
    )
    pieces: list[tuple[str, bool]] = []
    last = 0
    for found in pattern.finditer(line):
        if found.start() > last:
            pieces.append((line[last : found.start()], False))
        pieces.append((found.group(0), True))
        last = found.end()
    if last < len(line):
        pieces.append((line[last:], False))
    return pieces
