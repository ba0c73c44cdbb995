"""Language models built from a layout string."""
