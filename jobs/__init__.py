"""Background training jobs: each runs in a worker process of its own; their state lives on disk.

    store.py       the on-disk layout of one job (config.json, status.json, metrics.jsonl, checkpoints/,
                   previews/, log.txt) with validated ids and file names and atomic JSON writes
    manager.py     JobManager: queue in order, one GPU job at a time, spawn / stop / resume workers,
                   finalize their exit loudly, adopt or mark interrupted after a restart, and emit
                   progress events from one watcher thread
    worker.py      the worker process (`python <pack>/jobs/worker.py <job_dir>`); a ComfyUI checkpoint's
                   task comes from comfy_backend.py (the pack's root), the offline worlds' from api.py
    http.py        the aiohttp handlers behind /distillery/jobs... (registered by nodes/routes.py)
    students.py    which LoRAs are distilled students, from their safetensors header (no torch)
    options.py     node settings -> the method's options and the job config (pure)

Nothing here imports ComfyUI at module level: the package is unit-tested without it.
"""
