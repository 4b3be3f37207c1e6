"""Alembic migrations of the service's own tables (shipped as a package so installs find them)."""
