"""The schema registry: every domain's tables in one `MetaData`, for Alembic's autogenerate
and for checks that walk the whole schema (erase, retention).

It lives here, on the top floor beside the migration scripts, because it imports every
domain; `core.migrate` only runs Alembic and knows no domain.
"""

from __future__ import annotations

from sqlalchemy import MetaData

from popdrop.core.db import Base


def target_metadata() -> MetaData:
    import popdrop.accounts.models
    import popdrop.attribution.models
    import popdrop.audience.models
    import popdrop.chat.models
    import popdrop.checkin.models
    import popdrop.commerce.models
    import popdrop.core.audit
    import popdrop.core.idempotency
    import popdrop.drops.models
    import popdrop.events.models
    import popdrop.inventory.models
    import popdrop.metrics.models
    import popdrop.metrics.survey_models
    import popdrop.outbound.models
    import popdrop.outbound.outbox
    import popdrop.partners.models
    import popdrop.rsvp.models
    import popdrop.vouchers.models  # noqa: F401

    return Base.metadata
