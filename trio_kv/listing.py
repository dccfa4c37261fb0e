"""``GET /data``: pages of a shard's keys, and the whole key space as seen by a routing node.

Pure: the core (``core/requests.py``) serves pages and gathers a routing node's listing.
A page is the live keys after a cursor, in key order, at most ``limit`` of them; the answer
names the cursor of the next page (``"next"``, ``null`` on the last page).  Without
``limit``/``after`` the answer is the original contract's, unchanged.  A node that has a view
but no shard (a *routing* node) asks one replica of every shard and merges their answers.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import orjson

from .clock import Version
from .core.events import Reply
from .metadata import Deps, MetadataError, TokenRules, merge_deps, parse_metadata, render_metadata

if TYPE_CHECKING:
    from .replica import Replica


class PageError(ValueError):
    """``limit``/``after`` are not valid; the message is shown to the client."""


@dataclass(frozen=True, slots=True)
class Page:
    after: str
    limit: int

    def query(self) -> str:
        return "?" + urlencode({"limit": self.limit, "after": self.after})


def parse_page(params: Mapping[str, str], max_items: int, max_key_bytes: int) -> Page | None:
    """The page a query string asks for; None when it asks for none (the original body)."""
    unknown = set(params) - {"limit", "after"}
    if unknown:
        raise PageError(f"unknown query parameters {sorted(unknown)!r}; use limit and after")
    if not params:
        return None
    limit = max_items
    if "limit" in params:
        text = params["limit"]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= max_items:
            raise PageError(f"limit must be an integer from 1 to {max_items}")
        limit = int(text)
    after = params.get("after", "")
    if len(after.encode("utf-8", "surrogatepass")) > max_key_bytes:
        raise PageError(f"after is longer than {max_key_bytes} bytes")
    return Page(after, limit)


def page_of(replica: Replica, rules: TokenRules, deps: Deps, page: Page) -> Reply | None:
    """One page of this replica's shard: live keys after the cursor, in key order; None when
    its token would be over the limits (the node waits for stability, as for a listing).

    The token covers what the page returned (its versions and their causal pasts), like the
    whole listing's does."""
    entries = replica.store.entries
    live = (k for k, e in entries.items()
            if e.value is not None and k > page.after and replica.owns(k))
    keys = heapq.nsmallest(page.limit + 1, live)
    more = len(keys) > page.limit
    keys = keys[: page.limit]
    pasts: list[Mapping[str, Version]] = [deps]
    current: Deps = {}
    items: dict[str, str] = {}
    for key in keys:
        entry = entries[key]
        current[key] = entry.version
        if entry.deps:
            pasts.append(entry.deps)
        items[key] = entry.value or ""
    out = replica.prune(merge_deps(*pasts, current))
    if not rules.fits(out):
        return None
    return Reply(200, {"items": items, "causal-metadata": render_metadata(out),
                       "next": keys[-1] if more else None})


def merge_listings(answers: Mapping[str, Reply], deps: Deps, page: Page | None) -> Reply:
    """A routing node's ``GET /data``: every shard's listing (or page), merged.

    Shards hold disjoint keys, so items are a union; tokens merge per key.  For a page, each
    shard gives its first ``limit`` keys after the cursor; the first ``limit`` of the union
    are the page, and there is a next page if any shard had more or the union was cut."""
    items: dict[str, str] = {}
    tokens: list[Deps] = [deps]
    more = False
    for shard in sorted(answers):
        reply = answers[shard]
        if reply.status != 200:
            return reply
        try:
            body = orjson.loads(reply.raw) if reply.raw is not None else reply.payload
            if not isinstance(body, dict) or not isinstance(body.get("items"), dict):
                raise MetadataError("no items")
            token = parse_metadata(body.get("causal-metadata"))
        except (orjson.JSONDecodeError, MetadataError):
            message = f"shard {shard} answered GET /data with a malformed body"
            return Reply(502, {"error": message, "causal-metadata": render_metadata(deps)})
        items.update(body["items"])
        tokens.append(token)
        more = more or body.get("next") is not None
    out = render_metadata(merge_deps(*tokens))
    if page is None:
        return Reply(200, {"items": items, "causal-metadata": out})
    keys = sorted(items)
    more = more or len(keys) > page.limit
    keys = keys[: page.limit]
    return Reply(200, {"items": {k: items[k] for k in keys}, "causal-metadata": out,
                       "next": keys[-1] if more and keys else None})
