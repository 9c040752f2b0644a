"""Data, training, evaluation and prediction."""
