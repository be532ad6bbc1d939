"""The errors of merging that every layer raises; each message names the key, model or
hyperparameter at fault."""


class MergeInputError(ValueError):
    """Models that cannot be merged: the message names the key, the model and the problem."""


class HyperparameterError(ValueError):
    """An unknown hyperparameter, or a value of the wrong type, out of range or not finite."""


class MethodNotApplicable(ValueError):
    """The method's own rule cannot be met on these models (e.g. no rank keeps AMR under the
    budget when the tensors it stores as they are already exceed it)."""


class NonFiniteOutputError(ValueError):
    """A merge whose outputs hold NaN or Inf; the message names the tensor."""
