"""One module per provider, each exposing ``PROVIDER`` (see :class:`sync_project.core.Provider`)."""
