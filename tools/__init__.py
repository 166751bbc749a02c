"""Development tooling: benchmark, demo, random-weight models, tiny checkpoints, workflow builder.

Imports fastvar_core; fastvar_core and nodes never import it (tests/test_boundary.py).
"""
