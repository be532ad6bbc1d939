"""The core layer: state-dict algebra and its checks, with no I/O and no method.

``errors`` (what every layer raises), ``tensors`` (state dicts, float32 casts, task vectors, the
merge device, row blocks and their scratch buffers), ``spec`` (the structure of a set of models
and the checks run on their values), ``bits`` (bit-packing), ``select`` (exact order statistics
by radix selection), ``accounting`` (ADR and AMR), ``registry`` (named, lazily loaded methods and
suites). Every other layer builds on these; they import nothing of the harness above them.
"""
