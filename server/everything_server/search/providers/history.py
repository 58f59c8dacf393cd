"""The user's own history: past chat messages and searches, by PostgreSQL full-text search.

Works offline. Rows are filtered by owner (and by row-level security where it is on). Ranking: every
row matching ANY word of the query is a candidate (natural-language questions rarely contain every
word of the text they are after); rows matching the whole query (`websearch_to_tsquery`, so
"quoted phrases" and -exclusions work) rank first, then by `ts_rank`. One hit per chat thread (its
best message). Snippets come from `ts_headline`, computed for the top rows only.

URLs: `everything:thread/<thread_id>` and `everything:search/<search_id>`. The running search itself
is never a hit (only completed and cancelled searches are).
"""

from __future__ import annotations

import re
import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.search.providers.base import Hit, ProviderError
from everything_server.search.providers.web import MAX_SNIPPET, MAX_TITLE, clean_text

MAX_WORDS = 32
_WORD = re.compile(r"\w+")

_SEARCH = text(
    """
    WITH q AS (
      SELECT websearch_to_tsquery('english', :strict) AS strict,
             websearch_to_tsquery('english', :loose) AS loose
    ),
    hits AS (
      (SELECT DISTINCT ON (m.thread_id)
              'thread' AS kind, m.thread_id AS id, t.title AS title, m.content AS body,
              ts_rank(m.search_vector, q.loose)
                + CASE WHEN m.search_vector @@ q.strict THEN 1 ELSE 0 END AS rank,
              m.created_at AS at
         FROM messages m
         JOIN threads t ON t.id = m.thread_id AND t.user_id = :uid
         CROSS JOIN q
        WHERE m.user_id = :uid AND m.search_vector @@ q.loose AND m.status <> 'generating'
        ORDER BY m.thread_id, rank DESC, m.created_at DESC)
      UNION ALL
      (SELECT 'search', s.id, s.query, s.query || E'\n' || s.summary,
              ts_rank(s.search_vector, q.loose)
                + CASE WHEN s.search_vector @@ q.strict THEN 1 ELSE 0 END,
              s.created_at
         FROM search_queries s CROSS JOIN q
        WHERE s.user_id = :uid AND s.search_vector @@ q.loose AND s.status IN ('completed', 'cancelled'))
    )
    SELECT top.kind, top.id, top.title,
           ts_headline('english', left(top.body, 20000), (SELECT loose FROM q),
                       'StartSel="", StopSel="", MaxWords=40, MinWords=15, MaxFragments=2, FragmentDelimiter=" … "')
             AS snippet
      FROM (SELECT * FROM hits ORDER BY rank DESC, at DESC LIMIT :limit) AS top
     ORDER BY top.rank DESC, top.at DESC
    """
)


def loose_query(query: str) -> str:
    """The query's words joined with OR, in websearch syntax (so no word can be an operator)."""
    words: list[str] = []
    for word in _WORD.findall(query.lower()):
        if word != "or" and word not in words:
            words.append(word)
        if len(words) >= MAX_WORDS:
            break
    return " or ".join(words)


class HistoryProvider:
    name = "history"
    uses_database = True

    async def search(
        self, query: str, *, limit: int, user_id: uuid.UUID, session: AsyncSession | None
    ) -> list[Hit]:
        if session is None:
            raise ProviderError(self.name, "needs a database session")
        loose = loose_query(query)
        if not loose:
            return []
        rows = await session.execute(
            _SEARCH, {"strict": query, "loose": loose, "uid": user_id, "limit": limit}
        )
        hits = []
        for row in rows:
            if row.kind == "thread":
                title = clean_text(row.title, MAX_TITLE, markup=False) or "Chat"
                url = f"everything:thread/{row.id}"
            else:
                title = clean_text(row.title, MAX_TITLE, markup=False)
                url = f"everything:search/{row.id}"
            hits.append(Hit(title, url, clean_text(row.snippet, MAX_SNIPPET, markup=False), self.name))
        return hits
