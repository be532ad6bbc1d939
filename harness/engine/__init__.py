"""The engine: the merge protocol every method runs on.

``method`` (the :class:`~harness.engine.method.MergeMethod` contract: typed hyperparameters and
declared hooks), ``templates`` (the shapes most methods take: one merged model from a per-block
rule, a per-task codec), ``masked`` (a shared tensor with per-task masks: EMR, TALL-Mask),
``passes`` (validation and the passes over the inputs, with value checks fused in),
``deferred`` (entries decided after the last key, held or spilled, then patched), ``outputs``
(in memory or streamed to shards), ``codecs`` (stored per-task payloads, registered by kind),
``result`` (:class:`~harness.engine.result.MergeResult`), ``storage`` (results on disk),
``serving`` (a result applied to a loaded model). Built on the io and core layers.
"""
