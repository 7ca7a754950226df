"""Organizations (tenants), operator accounts, roles and API tokens."""
