"""Real-time SaaS syncs on Dagster: polling and webhooks merged into one records store."""

__version__ = "0.1.0"
