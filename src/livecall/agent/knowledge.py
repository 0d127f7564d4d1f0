"""The business's own documents, searchable offline: what the `lookup` tool answers from.

A folder of Markdown, text and PDF files is cut into passages of a few hundred characters on
paragraph boundaries (each remembering its file and heading or page) and indexed in SQLite FTS5,
ranked with BM25. Nothing leaves the machine. Files are re-read only when their mtime or size
changes, so a large folder costs one `stat` per file per refresh. Every method here blocks:
call the `a…` variants from the event loop, they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from livecall.log import get_logger

__all__ = ["SUPPORTED_SUFFIXES", "KnowledgeBase", "Passage", "RefreshStats", "split_passages"]

log = get_logger("livecall.knowledge")

SUPPORTED_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".pdf"})
_SCHEMA_VERSION = 1
_MAX_FILE_BYTES = 50 * 1024 * 1024
_MAX_QUERY_TERMS = 32
_WORD = re.compile(r"\w+", re.UNICODE)
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
# Words so common in spoken questions that matching them only adds noise to the ranking.
_STOPWORDS = frozenset(
    _WORD.findall(
        "a an and are as at be but by can could do does for from have how i if in is it me my "
        "of on or please so tell than that the their there this to was we what when where "
        "which who will with would you your"
    )
)


@dataclass(frozen=True)
class Passage:
    """One search hit: the text, where it came from, and its BM25 relevance (higher is better)."""

    text: str
    source: str
    score: float
    heading: str | None = None
    page: int | None = None

    @property
    def citation(self) -> str:
        """How the agent can name the source: ``menu.pdf, page 2`` or ``faq.md › Parking``."""
        if self.page is not None:
            return f"{self.source}, page {self.page}"
        if self.heading:
            return f"{self.source} › {self.heading}"
        return self.source

    def as_dict(self) -> dict[str, object]:
        return {"text": self.text, "source": self.citation, "score": round(self.score, 3)}


@dataclass(frozen=True)
class RefreshStats:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


def _split_long(text: str, max_chars: int) -> Iterator[str]:
    """Cut an over-long paragraph at sentence ends, or at spaces when a sentence is too long."""
    chunk = ""
    for sentence in _SENTENCE_END.split(text):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            head, sentence = sentence[:cut].rstrip(), sentence[cut:].lstrip()
            if chunk:
                yield chunk
                chunk = ""
            yield head
        if chunk and len(chunk) + 1 + len(sentence) > max_chars:
            yield chunk
            chunk = sentence
        else:
            chunk = f"{chunk} {sentence}" if chunk else sentence
    if chunk:
        yield chunk


def split_passages(
    text: str, *, markdown: bool = False, target_chars: int = 500, max_chars: int = 800
) -> list[tuple[str | None, str]]:
    """(heading, passage) pairs: paragraphs packed up to ~`target_chars`, never above `max_chars`.

    A Markdown heading always starts a new passage and names the passages below it, so a hit
    can say which section it came from.
    """
    out: list[tuple[str | None, str]] = []
    heading: str | None = None
    buf: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            out.append((heading, "\n\n".join(buf)))
        buf, size = [], 0

    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.strip().splitlines()]
        if not lines:
            continue
        if markdown:
            body: list[str] = []
            for line in lines:
                match = _HEADING.match(line)
                if match:
                    if body:
                        buf.append("\n".join(body))
                        body = []
                    flush()
                    heading = match.group(2).strip()
                else:
                    body.append(line)
            lines = body
            if not lines:
                continue
        paragraph = "\n".join(lines).strip()
        if not paragraph:
            continue
        pieces = (
            [paragraph] if len(paragraph) <= max_chars else list(_split_long(paragraph, max_chars))
        )
        for piece in pieces:
            if buf and (size >= target_chars or size + 2 + len(piece) > max_chars):
                flush()
            buf.append(piece)
            size += len(piece) + (2 if size else 0)
    flush()
    return out


def fts_query(query: str) -> str | None:
    """User words -> a safe FTS5 expression: each word quoted, OR-ed (BM25 ranks by overlap).

    Quoting makes every token a literal string, so no input (quotes, `NEAR`, `*`, `-`,
    parentheses, column filters) can produce an FTS5 syntax error. None when nothing is left.
    """
    words = [w.lower() for w in _WORD.findall(query)]
    kept = [w for w in words if w not in _STOPWORDS] or words
    unique = list(dict.fromkeys(kept))[:_MAX_QUERY_TERMS]
    if not unique:
        return None
    return " OR ".join(f'"{w}"' for w in unique)


class KnowledgeBase:
    """A folder of documents and its FTS5 index (in memory unless `index_path` is given).

    `search` refreshes the index first when it was never built or when `check_interval_s` has
    passed since the last look, so files dropped into the folder become searchable without a
    restart. A persistent `index_path` makes restarts cheap: unchanged files are not re-read.
    """

    def __init__(
        self,
        folder: str | Path,
        index_path: str | Path | None = None,
        *,
        check_interval_s: float = 5.0,
        target_chars: int = 500,
        max_chars: int = 800,
    ) -> None:
        self.folder = Path(folder)
        self.index_path = Path(index_path) if index_path is not None else None
        self.check_interval_s = check_interval_s
        self.target_chars = target_chars
        self.max_chars = max_chars
        self._lock = threading.Lock()  # guards the connection
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._last_check: float | None = None
        db = str(self.index_path) if self.index_path else ":memory:"
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self._init_schema()

    def _init_schema(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version != _SCHEMA_VERSION:
            self._db.executescript(
                """
                DROP TABLE IF EXISTS files;
                DROP TABLE IF EXISTS passages;
                """
            )
        self._db.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS files (
                path TEXT PRIMARY KEY, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL
            );
            CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(
                text, heading, source UNINDEXED, page UNINDEXED,
                tokenize = 'porter unicode61 remove_diacritics 2'
            );
            PRAGMA user_version = {_SCHEMA_VERSION};
            """
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ----------------------------------------------------------------- indexing

    def _scan(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        if not self.folder.is_dir():
            return found
        for path in sorted(self.folder.rglob("*")):
            rel = path.relative_to(self.folder)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if path.suffix.lower() not in SUPPORTED_SUFFIXES or not path.is_file():
                continue
            if self.index_path is not None and path.resolve() == self.index_path.resolve():
                continue
            st = path.stat()
            if st.st_size > _MAX_FILE_BYTES:
                log.warning("knowledge.file_too_large", file=str(rel), bytes=st.st_size)
                continue
            found[rel.as_posix()] = (st.st_mtime_ns, st.st_size)
        return found

    def _read(self, rel: str) -> list[tuple[str | None, int | None, str]]:
        """(heading, page, text) passages of one file; a broken file yields none, with a warning."""
        path = self.folder / rel
        suffix = path.suffix.lower()
        try:
            if suffix == ".pdf":
                return self._read_pdf(path)
            text = path.read_bytes().decode("utf-8", errors="replace")
        except Exception as exc:  # a corrupt document must not break the whole index
            log.warning("knowledge.unreadable", file=rel, error=f"{type(exc).__name__}: {exc}")
            return []
        markdown = suffix in (".md", ".markdown")
        return [
            (heading, None, passage)
            for heading, passage in split_passages(
                text, markdown=markdown, target_chars=self.target_chars, max_chars=self.max_chars
            )
        ]

    def _read_pdf(self, path: Path) -> list[tuple[str | None, int | None, str]]:
        from pypdf import PdfReader  # imported here: only folders with PDFs pay for it

        reader = PdfReader(path)
        out: list[tuple[str | None, int | None, str]] = []
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            for _heading, passage in split_passages(
                text, target_chars=self.target_chars, max_chars=self.max_chars
            ):
                out.append((None, number, passage))
        return out

    def refresh(self) -> RefreshStats:
        """Bring the index up to date with the folder; only new or changed files are read."""
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> RefreshStats:
        found = self._scan()
        with self._lock:
            known = {
                path: (mtime, size)
                for path, mtime, size in self._db.execute("SELECT path, mtime_ns, size FROM files")
            }
            added = [p for p in found if p not in known]
            updated = [p for p in found if p in known and known[p] != found[p]]
            removed = [p for p in known if p not in found]
            unchanged = len(found) - len(added) - len(updated)
        contents = {rel: self._read(rel) for rel in [*added, *updated]}
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for rel in [*updated, *removed]:
                    self._db.execute("DELETE FROM passages WHERE source = ?", (rel,))
                    self._db.execute("DELETE FROM files WHERE path = ?", (rel,))
                for rel, passages in contents.items():
                    self._db.executemany(
                        "INSERT INTO passages (text, heading, source, page) VALUES (?, ?, ?, ?)",
                        [(text, heading or "", rel, page) for heading, page, text in passages],
                    )
                    mtime, size = found[rel]
                    self._db.execute(
                        "INSERT INTO files (path, mtime_ns, size) VALUES (?, ?, ?)",
                        (rel, mtime, size),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._last_check = time.monotonic()
        stats = RefreshStats(len(added), len(updated), len(removed), unchanged)
        if stats.changed:
            log.info(
                "knowledge.indexed",
                folder=str(self.folder),
                added=stats.added,
                updated=stats.updated,
                removed=stats.removed,
            )
        return stats

    async def arefresh(self) -> RefreshStats:
        return await asyncio.to_thread(self.refresh)

    # ------------------------------------------------------------------ search

    def _due(self) -> bool:
        return self._last_check is None or (
            time.monotonic() - self._last_check >= self.check_interval_s
        )

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The `k` passages that best answer `query`, best first; [] when nothing matches."""
        if self._due():
            self.refresh()
        expression = fts_query(query)
        if expression is None or k <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                """
                SELECT text, source, bm25(passages, 1.0, 2.0) AS rank, heading, page
                FROM passages WHERE passages MATCH ? ORDER BY rank LIMIT ?
                """,
                (expression, k),
            ).fetchall()
        return [
            Passage(
                text=text,
                source=source,
                score=-rank,
                heading=heading or None,
                page=int(page) if page is not None else None,
            )
            for text, source, rank, heading, page in rows
        ]

    async def asearch(self, query: str, k: int = 3) -> list[Passage]:
        """`search` in a worker thread, so the call's audio keeps flowing."""
        return await asyncio.to_thread(self.search, query, k)

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM passages").fetchone()
        return int(count)
