"""Catalog refresh without retraining: embed a landed catalog's new products with the served encoder, rebuild the
dense and BM25 indexes for the same model version."""
