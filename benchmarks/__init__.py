"""natskv benchmarks.

- ``bench_kv.py`` and ``bench_core.py``: the asv suite (``asv machine --yes`` once, then
  ``asv run --python=same --quick --show-stderr``; see asv.conf.json).
- ``compare.py``: one side-by-side run against raw nats-py and the pure-Python core, printed as a
  table of medians and ratios (``python benchmarks/compare.py [--quick]``).
- ``_server.py``: starts a throwaway nats-server for a run and connects natskv to it.

Absolute times on a small shared machine are noise; the ratios measured in one run are the signal.
"""
