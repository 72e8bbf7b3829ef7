"""Streaming continual learning (DESIGN §9, issue 20): documents arrive unlabelled and in order;
the detector decides where a new domain starts and whether it is one already known, and
`crma stream` trains an adapter for each new one.

- `metrics`: boundary precision/recall/F1 within a margin, detection delay, false alarms,
  new-vs-known accuracy, adjusted Rand index.
- `detector`: novelty against every known domain + a CUSUM change test on the router's base
  embeddings.
- `segment`: the detector over a file of documents (`crma segment`).
- `learner`: the detector driving training, logged and resumable (`crma stream`).
"""
