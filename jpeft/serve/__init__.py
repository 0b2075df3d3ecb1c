"""`jpeft serve`: an HTTP server answering completions for many LoRA adapters on one base.

`engine` generates (mixed-adapter batches, `jpeft.mixed`); `app` is the aiohttp application
(OpenAI-style routes, batching of concurrent requests); `serve` loads a model and runs both.
"""

from __future__ import annotations

from collections.abc import Mapping


def serve(
    model_path: str,
    adapters: Mapping[str, str],
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    batch_window: float = 0.01,
) -> None:
    """Load `model_path` and the LoRA adapters {name: folder}, then serve until Ctrl-C."""
    from aiohttp import web

    import jpeft
    from jpeft.serve.app import make_app
    from jpeft.serve.engine import Engine

    model, params = jpeft.models.from_pretrained(model_path)
    engine = Engine(model, params, jpeft.models.load_tokenizer(model_path), max_batch)
    for name, path in adapters.items():
        engine.load(name, path)
    base_name = str(model_path).rstrip("/").rsplit("/", 1)[-1]
    app = make_app(engine, base_name, batch_window, max_batch)
    print(f"serving {base_name} and adapters {list(adapters)} on http://{host}:{port}/v1")
    web.run_app(app, host=host, port=port, print=None)
