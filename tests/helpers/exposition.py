"""Reading Prometheus text exposition in tests: the metric names a scrape carries."""

from __future__ import annotations


def sample_names(exposition: str) -> set[str]:
    """The names of every sample in `exposition`, without labels or values."""
    return {
        line.split("{")[0].split(" ")[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }
