"""Drops and mailings: email + SMS sends with per-recipient vouchers, seed tests, A/B."""
