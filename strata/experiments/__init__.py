"""Experiments: sweeps of runs matched by a budget, and reports (tables and plots) over their runs.

The top layer: it trains (``strata.train``), evaluates (``strata.evals``) and prices
(``strata.cost``) runs, and nothing below imports it."""
