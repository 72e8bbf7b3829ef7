"""`crma run`: methods × seeds × domains on identical data, with the loss matrix after every stage.

Run directory: config.yaml (resolved), report.json, report.md, plots/, and per method and seed:
loss_matrix.json, metrics.jsonl, stack/. Everything is resumable: a stage whose domain the stack
lists is not retrained, a loss-matrix row on disk is not recomputed, and evaluations whose
weights are unchanged (same fingerprint) are reused, not rerun.

Modules: `config` (the YAML schema and what decides one unit's results), `data` (tokenized
domains), `run` (the loop), `store` (finished units, reuse from other runs, export).
"""
