"""Edit stages: change what an image says or carries without reworking it: text drawn on it,
its metadata, the safety check."""

from __future__ import annotations
