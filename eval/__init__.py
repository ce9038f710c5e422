"""Evaluation code for sdmerge's experiments (used by ``scripts/``; not installed with sdmerge).

Import it from the repository root (``PYTHONPATH=.`` or a script that puts the root on ``sys.path``).
"""
