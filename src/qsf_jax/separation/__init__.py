"""The separation experiment: complex unitary vs real orthogonal models (wave-function paper §2)."""
