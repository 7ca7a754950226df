"""Inventory: product cards, variants, stock per lane, holds with TTL, never oversold."""
