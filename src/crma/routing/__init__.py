"""Routing: which domain's adapter should answer a prompt.

Three routers, each returning a domain and a confidence per prompt:

- `centroid` (default, stored in the stack): the frozen base's mean-pooled hidden states of a
  domain's training texts (pooled from the second token on, the first being an attention sink;
  optionally also of each text's first N tokens, `prefixes`), standardised with the pooled
  statistics of all domains (a few outlier dimensions of LLM hidden states would otherwise decide every distance). Its `head` scores a
  prompt: `logistic` (default), a small L2-regularised multinomial logistic regression fitted on
  the stored embeddings when the router is loaded (convex, so the fit is deterministic), or
  `prototype`, the cosine to each domain's mean. Adding a domain stores its embeddings and
  leaves earlier domains' entries, and every adapter, as they are.
- `arrow` (data-free, Ostapenko et al. 2024): the top right-singular vector of each adapter's
  B·A per adapted module; a prompt scores |cos(h, v)| averaged over tokens and modules, h being
  the module's input. Works on adapters imported from elsewhere.
- `loss`: the domain whose adapters give the prompt the lowest loss; an expensive upper bound.

Below `threshold` confidence, a route falls back to no adapter (base + CRMA backbone).

Modules: `embed` (hidden states of the frozen base), `index` (the stored centroid router and
its persistence; below `crma.continual`, which adds each domain's entry on commit), `router`
(the `Router` façade over the three routers, above `crma.continual`), `arrow`, `metrics`
(top-1, confusion matrices, their plot).
"""
