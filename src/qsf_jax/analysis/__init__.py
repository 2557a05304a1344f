"""Spectral transparency of trained Koopman checkpoints (QSF §2.3-2.4, §4.4, §6).

Array-level functions (usable in a notebook without a checkpoint):

>>> from qsf_jax import analysis
>>> spec = analysis.spectrum_summary(K_LDD)                 # eqs. 4-9, float64
>>> analysis.plot_spectrum(analysis.eigenvalues_per_layer(spec), path="spectrum.png")
>>> analysis.unit_circle_check(K_LDD)["all_on_unit_circle"]  # Stage IV (D18)

and the whole pipeline on a run folder, ``analyze_workdir(workdir)``
(``python -m experiments.analyze --workdir=DIR``).
"""

from qsf_jax.analysis.history import alpha_history, loss_curves, read_metrics
from qsf_jax.analysis.modes import (
    ModeBasis,
    TokenOccupancy,
    effective_gain_from_weights,
    mode_basis,
    mode_weights,
    token_category,
    top_mode_group,
)
from qsf_jax.analysis.operators import (
    KOOPMAN_STAGES,
    LayerOperators,
    check_koopman_stage,
    layer_operators,
)
from qsf_jax.analysis.pipeline import analyze_workdir, checkpoint_stage, pick_layer
from qsf_jax.analysis.plots_dynamics import (
    plot_alpha,
    plot_losses,
    plot_occupancy,
    plot_propagation,
    plot_sse,
    plot_stage_losses,
)
from qsf_jax.analysis.plots_spectrum import plot_layer_budget, plot_log_abs_histogram, plot_spectrum
from qsf_jax.analysis.propagation import (
    exact_subset,
    layer_dynamics,
    propagate_sentence,
    sse_ensemble,
    state_target,
)
from qsf_jax.analysis.report import render_report, write_json, write_report
from qsf_jax.analysis.spectrum import (
    REPORT_TOLS,
    compact,
    eigenvalues_per_layer,
    spectrum_summary,
    unit_circle_check,
    verdict,
)
from qsf_jax.analysis.validation import (
    norm_statistics,
    sequence_rms,
    valid_inputs,
    validation_statistics,
)
