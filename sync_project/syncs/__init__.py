"""One module per sync, each declaring a :class:`sync_project.core.SyncDefinition`."""
