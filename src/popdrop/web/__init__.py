"""The web edge: app factory, auth and roles, shared page layout, static files."""
