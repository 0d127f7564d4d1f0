"""What the carriers' fakes keep of a warm transfer: the answered leg fetching its whisper, and
the caller's leg asking what next once the dial ended (`WarmFetch`), and how they read the
documents they got (XML `<Say>`/`<Speak>` or an NCCO's `talk`s).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["WarmFetch", "ncco_said", "xml_reader", "xml_said", "xml_verbs"]


@dataclass
class WarmFetch:
    """One request a fake made to the app for a warm transfer, and what came back."""

    url: str
    target: str
    form: dict[str, str]
    status_code: int | None = None
    body: str | None = None
    error: str | None = None
    said: list[str] = field(default_factory=list)  # what the leg heard
    verbs: list[str] = field(default_factory=list)  # the document's verbs (actions), in order

    async def fetch(
        self,
        send: Callable[[], Awaitable[httpx.Response]],
        read: Callable[[str], tuple[list[str], list[str]]],
        kind: str,
    ) -> None:
        """Makes the request (`send`) and keeps what came back: the status, and for a 200 the
        document read by `read` into (verbs, said); a transport error or a document that is
        not a `kind` is kept in `error`."""
        try:
            response = await send()
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.status_code = response.status_code
        if response.status_code != 200:
            return
        self.body = response.text
        try:
            self.verbs, self.said = read(response.text)
        except (ET.ParseError, ValueError) as exc:
            self.error = f"not {kind}: {exc}"


def xml_verbs(document: str) -> list[str]:
    root = ET.fromstring(document)
    if root.tag != "Response":
        raise ValueError(f"the root is <{root.tag}>, not <Response>")
    return [child.tag for child in root]


def xml_said(document: str, tag: str) -> list[str]:
    """The text of each `tag` (`Say`, `Speak`) at the top of an XML document."""
    return [(el.text or "").strip() for el in ET.fromstring(document) if el.tag == tag]


def xml_reader(tag: str) -> Callable[[str], tuple[list[str], list[str]]]:
    """(verbs, the text of each `tag`) of an XML answer document, for `WarmFetch.fetch`."""
    return lambda document: (xml_verbs(document), xml_said(document, tag))


def ncco_said(document: str) -> tuple[list[str], list[str]]:
    """(the actions, the talk texts) of an NCCO; ValueError when it is not one."""
    ncco: Any = json.loads(document)
    if type(ncco) is not list or not all(type(a) is dict for a in ncco):
        raise ValueError("an NCCO is a JSON array of actions")
    actions = [str(a.get("action")) for a in ncco]
    said = [str(a.get("text")) for a in ncco if a.get("action") == "talk"]
    if not all(a.get("text") for a in ncco if a.get("action") == "talk"):
        raise ValueError("talk needs a text")
    return actions, said
