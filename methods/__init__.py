"""Merge methods, one module each; registered by name in :data:`harness.registry.METHODS`."""
