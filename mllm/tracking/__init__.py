"""Tracking: everything MLflow and Optuna hold (runs, registry, artifacts, pre-flight, locks,
the search's trial storage, the pyfunc model)."""
