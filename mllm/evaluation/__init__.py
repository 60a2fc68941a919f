"""Evaluation: metrics, choices under noise, selection and readings, baselines, the report."""
