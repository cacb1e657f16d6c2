"""Quantization: integer grids and scales (`qparams`), range estimators (`observers`), calibration."""
