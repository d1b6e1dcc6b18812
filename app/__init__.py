"""lowbit's server: HTTP API, protocol, scheduler, metrics, settings and CLI."""
