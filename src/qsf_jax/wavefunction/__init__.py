"""The wave-function sequence model core (arXiv 2602.22255): Cayley cell, Born readout, currents."""

from qsf_jax.wavefunction.born import (
    amplitudes,
    born_logits,
    born_probabilities,
    normalized_born,
    povm_from_isometry,
    povm_probabilities,
)
from qsf_jax.wavefunction.cayley import (
    cayley_products,
    cayley_scan,
    cayley_scan_parallel,
    cayley_step,
    cayley_unitary,
    hamiltonian_from_unitary,
    orthogonal_cayley,
    orthogonal_step,
)
from qsf_jax.wavefunction.currents import (
    CurrentsTrace,
    cayley_scan_with_currents,
    instantaneous_currents,
    probability_currents,
    readout_rates,
)
from qsf_jax.wavefunction.hermitian import (
    dagger,
    hermitian_from_real,
    isometry_from_real,
    random_hermitian,
    realify,
    realify_state,
    skew_from_real,
)
