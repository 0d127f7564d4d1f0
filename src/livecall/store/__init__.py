"""Call records: every call kept in a real database (SQLite by default, PostgreSQL too).

`CallStore` (writer.py) is what the app holds: `observer(call_sid)` for the bridge, `repo` for
reads. Recordings live in a `RecordingStore` (recordings.py); the schema in models.py and
the Alembic migrations shipped in migrations/.
"""

from livecall.store.recordings import LocalRecordingStore, RecordingStore
from livecall.store.repository import Repository
from livecall.store.writer import CallRecordWriter, CallStore

__all__ = ["CallRecordWriter", "CallStore", "LocalRecordingStore", "RecordingStore", "Repository"]
