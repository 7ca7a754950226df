"""Attribution calls made by the partners domain, recorded (they still reach the real
attribution service)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from popdrop.partners import service


@pytest.fixture
def attribution_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    calls: list[tuple[str, dict[str, Any]]] = []
    real_attribute, real_reverse = service.attribute_sale, service.reverse_sale

    async def attribute(session: Any, **kwargs: Any) -> Any:
        calls.append(("attribute", kwargs))
        return await real_attribute(session, **kwargs)

    async def reverse(session: Any, **kwargs: Any) -> Any:
        calls.append(("reverse", kwargs))
        return await real_reverse(session, **kwargs)

    monkeypatch.setattr(service, "attribute_sale", attribute)
    monkeypatch.setattr(service, "reverse_sale", reverse)
    yield calls
