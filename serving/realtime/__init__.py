"""Live events: ingestion, the realtime action store (SQLite or Redis), the hand-off to the event source."""
