"""The I/O layer: files read and written safely, models read lazily, pages held only as long as
a merge needs them, shards written as they are made.

``files`` (checksums, atomic writes, bounded reads of untrusted files, folders moved into place
whole), ``torch_pickle`` (``torch.save`` files read without running their code), ``lazy``
(:class:`~harness.io.lazy.LazyStateDict` over safetensors files and shard indexes), ``pages``
(memory-mapped pages handed back after each key, read-ahead of the next keys, memory limits),
``shards`` (a state dict written to safetensors shards tensor by tensor). Built on the core
layer only.
"""
