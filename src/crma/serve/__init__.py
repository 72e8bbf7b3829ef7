"""`crma serve`: one process that serves a stack through the OpenAI API and grows it live.

    app.py       the Server (what one process holds), the app, OpenAI-shaped errors, models
    guard.py     the bearer key and body limits (ASGI middleware)
    generation.py  chat and completions routes: whole or streamed answers
    fine_tuning.py files and fine-tuning jobs routes
    schemas.py   request models (pydantic) and their checks
    batcher.py   the continuous-batching decoder: one thread owns the model, mixed adapters
    snapshot.py  a loaded stack as the batcher serves it
    prefill.py   joining requests prefilled together, the chat template's head from a cache
    mixed.py     each row through its own LoRA adapter (hooks registered once)
    sampling.py  greedy / temperature / top_p next-token choice
    kv.py        the batch's KV cache: merge new rows in by left padding
    store.py     files, jobs and events in SQLite inside the stack (WAL)
    files.py     uploads: the data loader's validation, the dataset optimizer, contamination
    jobs.py      the job scheduler (one worker process at a time) and its metrics tail
    worker.py    the worker process: trains one domain through ContinualModel.add_domain
    metrics.py   Prometheus metrics
    dashboard/   the web page at `/`: server-rendered views (templates/), a small script and
                 styles (static/), their data (views.py) behind the key under /ui/

It sits on top of crma: it uses load_stack/StackModel, Router and ContinualModel, the same
public objects the CLI uses; nothing below imports it.
"""
