"""Small iterator helpers shared by the stages."""

from __future__ import annotations

from collections.abc import Iterator


def grouped(it, n: int) -> Iterator[list]:
    """Consecutive groups of n items; a short tail is returned too (the caller decides)."""
    group = []
    for item in it:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group
