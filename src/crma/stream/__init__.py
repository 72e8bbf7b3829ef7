"""Streaming continual learning: documents arrive unlabelled and in order;
the detector decides where a new domain starts and whether it is one already known, and
`crma stream` trains an adapter for each new one.

- `metrics`: boundary precision/recall/F1 within a margin, detection delay, false alarms,
  new-vs-known accuracy, adjusted Rand index.
- `detector`: a windowed two-sample change test against the current domain, and the
  identification of a new segment against every known domain, on the router's base
  embeddings (with a CUSUM estimate of where the change began, and a confirmation that the
  change persists before a segment is opened); `Oracle`, the true segments replayed.
- `segment`: the detector over a file of documents (`crma segment`).
- `learner`: the detector driving training, logged and resumable (`crma stream`).
"""
