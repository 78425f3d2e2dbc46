"""Evaluation: a bundle's retrieval and category metrics, the fusion-weight sweep, personalisation, the gate."""
