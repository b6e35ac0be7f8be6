"""Evaluation harness: metrics, the built-in demo teacher and reports."""
