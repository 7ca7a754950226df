"""Partners: local partners, their tills (POS) and the sales they report under the
pos.sale.v1 contract."""
