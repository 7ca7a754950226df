"""Shared foundations: settings, database, clock, money, signing, errors, audit ledger."""
