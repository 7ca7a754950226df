"""The pos.sale.v1 contract: the documented JSON Schema is the model's, unknown fields are
dropped, and a refund names its sale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from popdrop.core.errors import PopdropError
from popdrop.partners.adapters import contract_from
from popdrop.partners.contract import PosSaleV1, pos_sale_json_schema_text
from tests.partners.helpers import standard_sale

SCHEMA = Path(__file__).parents[2] / "docs" / "pos.sale.v1.schema.json"


def test_the_documented_schema_is_the_model() -> None:
    assert SCHEMA.read_text() == pos_sale_json_schema_text(), (
        "regenerate docs/pos.sale.v1.schema.json from popdrop.partners.contract"
    )


def test_the_schema_accepts_what_the_model_accepts() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(standard_sale(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(standard_sale(currency="euro"), schema)


def test_unknown_fields_are_dropped() -> None:
    body = standard_sale(customer={"name": "Jane Roe", "email": "jane@example.com"})
    body["lines"][0]["title"] = "Jane's engraved mug"
    body["source"]["cashier"] = "Bob"
    sale = contract_from(body)
    dumped = json.dumps(sale.model_dump(mode="json"))
    assert "Jane" not in dumped and "Bob" not in dumped and "jane@example.com" not in dumped
    assert set(PosSaleV1.model_fields) >= {"source", "lines", "totals", "codes", "customer_ref"}


def test_a_refund_names_what_it_refunds() -> None:
    with pytest.raises(PopdropError) as refused:
        contract_from(standard_sale(kind="refund"))
    assert refused.value.reason == "malformed"
    refund = contract_from(standard_sale(kind="refund", refunds="S-1000"))
    assert refund.refunds == "S-1000"


def test_a_refusal_names_fields_never_values() -> None:
    with pytest.raises(PopdropError) as refused:
        contract_from(standard_sale(currency="4242424242424242"))
    assert "4242424242424242" not in json.dumps(refused.value.to_dict())
    assert refused.value.to_dict()["fields"] == ["currency"]


def test_times_carry_an_offset() -> None:
    with pytest.raises(PopdropError):
        contract_from(standard_sale(occurred_at="2026-12-03T10:15:00"))


def test_the_schema_requires_refunds_on_a_refund() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(standard_sale(kind="refund"), schema)
    jsonschema.validate(standard_sale(kind="refund", refunds="S-1"), schema)
