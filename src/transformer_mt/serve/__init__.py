"""`mt-serve`: one checkpoint in memory behind a small HTTP API (Starlette on uvicorn).

A thin layer over the `Translator`, in the order a request meets it:

    settings.py   every bound and batching setting, with its default and its check
    requests.py   a request body -> sentences and decoding settings, or a `RequestError`
    engine.py     the one model: tokenize, decode a batch (the CLI's decoding code), attention
    batcher.py    an asyncio queue that gathers concurrent requests into one decode
    metrics.py    counters and a latency histogram in Prometheus' text format
    app.py        the routes, the error replies and the start/stop of the batcher

Needs the `serve` extra: `pip install -e ".[serve]"`.
"""
