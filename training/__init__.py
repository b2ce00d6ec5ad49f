"""Training, data preparation and evaluation (run from the repository root: ``python -m training.train``)."""
