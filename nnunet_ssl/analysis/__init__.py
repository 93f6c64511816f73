"""Evaluation: metrics, statistics, CKA, reports."""
