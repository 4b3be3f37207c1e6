"""The hptune service: REST API, database, workers and CLI."""
