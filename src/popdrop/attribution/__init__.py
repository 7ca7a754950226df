"""Attribution: short links, clicks, promo codes, and which message, code or link
brought each sale."""
