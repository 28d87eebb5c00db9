"""Faithfulness metrics and evaluation runs for classifiers and detectors."""
