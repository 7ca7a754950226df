"""REST API and public routes of the partners domain (filled in by the issue-17 change)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
public_router = APIRouter()
