"""Only for running the partners tests before `popdrop.attribution.service` exists:
`pytest -p tests.partners._fake_attribution`. Installs a do-nothing stand-in when (and
only when) the real module is missing."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

try:
    importlib.import_module("popdrop.attribution.service")
except ModuleNotFoundError:
    fake = types.ModuleType("popdrop.attribution.service")

    async def attribute_sale(session: Any, **kwargs: Any) -> list[Any]:
        return []

    async def reverse_sale(session: Any, **kwargs: Any) -> None:
        return None

    fake.attribute_sale = attribute_sale  # type: ignore[attr-defined]
    fake.reverse_sale = reverse_sale  # type: ignore[attr-defined]
    sys.modules["popdrop.attribution.service"] = fake
