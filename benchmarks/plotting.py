"""matplotlib for the benchmark scripts, headless, or None where it is not installed (the
results tables are written either way)."""
from __future__ import annotations


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return None
    return plt
