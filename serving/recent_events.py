"""Recent user actions held in memory for the service's online path (a stream-fed store plays this role in
production: anything with ``get(user_ids) -> EventArrays`` and an ``as_of``).

Built from the event source's last ``lookback_days`` before ``as_of`` (by default the history's ``max_history_days``,
the window the refresh flow reads), so the online path and a stored state see the same history.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from towerflow.data.source import EventSource
from towerflow.serving.history import source_horizon
from towerflow.tasks.history import EventArrays, to_us


class RecentEvents:
    """History actions (raw ids) in [as_of - lookback, as_of), grouped by user, each user's in time order."""

    def __init__(self, events: EventArrays, as_of: datetime, users: pd.DataFrame | None = None):
        self.as_of = as_of
        self.as_of_us = to_us(as_of)
        self.users = users  # the users table read with these events (profiles come from it)
        order = np.argsort(events.user_id, kind="stable")  # stable: time order kept inside each user
        self._ev = events.take(order)
        self._users, start = np.unique(self._ev.user_id, return_index=True)
        self._bounds = np.append(start, len(self._ev)).astype(np.int64)

    @classmethod
    def from_source(cls, source: EventSource, lookback_days: int, as_of: datetime | None = None) -> RecentEvents:
        """Read ``[as_of - lookback_days, as_of)``; ``as_of`` None: the source's horizon (see source_horizon)."""
        as_of = as_of or source_horizon(source.days())
        events = source.read_events(as_of - timedelta(days=lookback_days), as_of)
        return cls(EventArrays.from_events(events), as_of, source.read_users())

    def __len__(self) -> int:
        """Number of users with at least one recent action."""
        return len(self._users)

    def get(self, user_ids) -> EventArrays:
        """The recent actions of ``user_ids`` (users with none contribute nothing)."""
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if len(self._users) == 0:
            return EventArrays.empty()
        pos = np.searchsorted(self._users, ids)
        found = (pos < len(self._users)) & (self._users[np.minimum(pos, len(self._users) - 1)] == ids)
        rows = [np.arange(self._bounds[p], self._bounds[p + 1]) for p in pos[found]]
        return self._ev.take(np.concatenate(rows)) if rows else EventArrays.empty()
