"""Moving weights between strata and other libraries (optional dependencies)."""
