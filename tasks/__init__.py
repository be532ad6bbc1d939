"""Suites, one file each (imported as ``harness.tasks``): the Suite contract in ``base``, shared
loading in ``hub``, ``cache`` and ``fetch``, and each suite's tasks, models, data and
evaluation; registered by name in :data:`harness.core.registry.SUITES`."""
