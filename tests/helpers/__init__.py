"""Shared test helpers: tiny float64-capable models (``tests.helpers.models``) and data (``tests.helpers.data``).

Import them as ``from tests.helpers.models import tiny_mlp`` (``tests`` is a package, so pytest puts the
repository root on ``sys.path``).
"""
