"""Analysis: the cost model (and, later, sweeps and reports)."""
