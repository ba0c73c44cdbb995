"""Evaluations of trained models: bits per byte on held-out text, multiple-choice accuracy on tasks."""
