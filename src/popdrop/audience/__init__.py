"""Audience and consent: contacts, consent ledger, opt-outs, suppression, segments, privacy."""
