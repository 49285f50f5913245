"""Benchmarks of streambroker against the equivalent raw redis-py code.

Run ``python -m bench`` (or ``./run bench``) from the repository root; ``--help``
lists the options. Not part of the test suite.
"""
