"""Header lists as the HTTP server and client take them: a mapping or (name, value) pairs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

HeaderItems = Mapping[str, str] | Iterable[tuple[str, str]] | None


def header_items(headers: Mapping[str, str] | Iterable[tuple[str, str]]
                 ) -> Iterable[tuple[str, str]]:
    """(name, value) pairs of `headers`."""
    # the gateway passes tuples and lists: they skip the (slower) ABC check
    if isinstance(headers, (tuple, list)):
        return headers
    return headers.items() if isinstance(headers, Mapping) else headers
