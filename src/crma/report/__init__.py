"""Report of a protocol run: drift, learning advantage, plasticity, spectral log, plots.

Everything here is computed from the run directory's loss_matrix.json and metrics.jsonl files,
so `crma report DIR` regenerates report.json, report.md and plots/ at any time.

Modules: `metrics` (the numbers from loss matrices), `build` (reading a run directory into
report.json), `markdown` (report.md), `plots` (plots/).
"""
