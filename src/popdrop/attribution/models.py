"""Tables of the attribution domain (filled in by the issue-17 change)."""

from __future__ import annotations
