"""The bench layer, on top: a run of a method on a suite, its typed record, leaderboards and the
``harness`` command.

``runner`` (validate, load, merge, evaluate, record), ``records`` (the typed run record, its JSON
Schema, reading and writing), ``leaderboard`` (markdown from records), ``unseen`` (similarity
weights for tasks no model was fine-tuned on), ``cli`` (argument parsing and printing). It
reaches concrete methods and suites only through the registries.
"""
