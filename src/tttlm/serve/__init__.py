"""``tttlm serve``: an OpenAI-compatible HTTP server whose sessions remember.

A session is a fixed-size decoding state (window caches and fast weights), so a conversation or
a long document costs the same memory per session however long it grows. The pieces:

* :mod:`tttlm.serve.api_errors`: OpenAI-shaped JSON errors;
* :mod:`tttlm.serve.schemas`: the request bodies;
* :mod:`tttlm.serve.text`: incremental decoding, stop strings, chat templates;
* :mod:`tttlm.serve.sessions`: sessions on disk and the in-memory LRU of hot ones;
* :mod:`tttlm.serve.worker`: the one thread that runs the engine and batches decoding;
* :mod:`tttlm.serve.app`: the FastAPI application;
* :mod:`tttlm.serve.cli`: the ``tttlm serve`` command.

Everything here needs the ``serve`` extra (FastAPI, uvicorn); ``tttlm --help`` imports none of it.
"""
