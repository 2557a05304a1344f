"""Synthetic task families with exact target distributions."""
