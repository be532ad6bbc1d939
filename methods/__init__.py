"""Merge methods, one file each (imported as ``harness.methods``): a method's file holds its
algorithm, its hyperparameters with the paper's defaults, its codec and its accounting, and
is registered by name in :data:`harness.core.registry.METHODS`."""
