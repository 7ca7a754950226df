"""The funnel: one append-only event log every domain writes in its own transaction, the
rollups that dashboards read, and the KPI and funnel queries over them."""
