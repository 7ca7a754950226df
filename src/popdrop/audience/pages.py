from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
public_router = APIRouter(include_in_schema=False)
