"""The wave-function sequence model core (arXiv 2602.22255): Cayley cell, Born readout, currents."""
