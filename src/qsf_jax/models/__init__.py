"""The model zoo: QSF stages, baselines and the wave-function LM (Flax Linen)."""
