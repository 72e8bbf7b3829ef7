"""Evaluation: held-out loss (`loss`), multiple-choice QA (`qa`, `stats`), the evaluations
`crma run` adds to a protocol (`hook`) and the report sections built from them (`sections`)."""
