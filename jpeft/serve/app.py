"""The HTTP side of `jpeft serve` (aiohttp): OpenAI-style completions over many LoRA adapters.

    POST   /v1/completions        {"model": <adapter name or the base's>, "prompt": "...",
                                   "max_tokens": 16}  -> {"choices": [{"text": ...}], "usage": ...}
    GET    /v1/models             the base model and every adapter served
    POST   /v1/adapters           {"name": "sql", "path": "/adapters/sql"}: load one at run time
    DELETE /v1/adapters/{name}    unload it

Requests that arrive within `batch_window` of each other (up to `max_batch`) are answered by one
mixed-adapter generate call (`jpeft.serve.engine`), which runs in one worker thread while the
server keeps accepting requests. Decoding is greedy (`temperature` 0 or absent). A bad request
gets a 4xx with an OpenAI-style error body naming the field; a failure inside generation a 500
for the requests of that batch only; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from jpeft.serve.engine import Completion, Engine, Request


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def make_app(
    engine: Engine, base_name: str, batch_window: float = 0.01, max_batch: int | None = None
) -> web.Application:
    """The aiohttp application serving `engine`; `base_name` is the base model's `model` name."""
    server = Server(engine, base_name, batch_window, max_batch or engine.max_batch)
    app = web.Application(middlewares=[errors_as_json])
    app.add_routes(
        [
            web.post("/v1/completions", server.completions),
            web.get("/v1/models", server.models),
            web.post("/v1/adapters", server.load_adapter),
            web.delete("/v1/adapters/{name}", server.unload_adapter),
        ]
    )
    app.on_startup.append(server.start)
    app.on_cleanup.append(server.stop)
    return app


class BackgroundServer:
    """`app` served on `host`:`port` (0: any free port) from a thread of its own, for notebooks,
    tests and benchmarks: `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, self.host, self.port)
        self.loop.run_until_complete(site.start())
        self.thread.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=60)
        self.loop.close()


@web.middleware
async def errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as err:
        return error_response(err.status, err.message, err.param)
    except web.HTTPException as err:  # aiohttp's own: unknown route, wrong method
        return error_response(err.status, err.reason)


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param}}
    return web.json_response(body, status=status)


class Server:
    """The request queue, the batching loop and the route handlers."""

    def __init__(self, engine: Engine, base_name: str, batch_window: float, max_batch: int):
        self.engine, self.base_name = engine, base_name
        self.batch_window, self.max_batch = batch_window, max_batch
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeft-generate")
        self.queue: asyncio.Queue | None = None
        self.loop_task: asyncio.Task | None = None

    async def start(self, app: web.Application) -> None:
        self.queue = asyncio.Queue()
        self.loop_task = asyncio.create_task(self.batches())

    async def stop(self, app: web.Application) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
        self.worker.shutdown(wait=True, cancel_futures=True)

    # -- routes --------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        model = body.get("model")
        if model not in (self.base_name, *self.engine.adapters):
            raise RequestError(
                404,
                f"model {model!r} is not served here; the models: "
                f"{[self.base_name, *self.engine.adapters]}",
                "model",
            )
        prompt_ids = self.prompt_ids(body)
        max_tokens = positive_int(body, "max_tokens", default=16)
        temperature = body.get("temperature", 0)
        if temperature not in (0, 0.0, None):
            raise RequestError(
                400, "jpeft serve decodes greedily: temperature must be 0", "temperature"
            )
        if len(prompt_ids) + max_tokens > self.engine.max_length:
            raise RequestError(
                400,
                f"the prompt's {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceed the "
                f"model's {self.engine.max_length} positions; shorten the prompt or max_tokens",
                "max_tokens",
            )
        adapter = None if model == self.base_name else model
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((Request(tuple(prompt_ids), max_tokens, adapter), future))
        completion: Completion = await future
        text = self.engine.tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
        used = len(completion.token_ids)
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex[:12]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"text": text, "index": 0, "finish_reason": completion.finish_reason}],
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": used,
                    "total_tokens": len(prompt_ids) + used,
                },
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        names = [self.base_name, *self.engine.adapters]
        data = [{"id": name, "object": "model", "owned_by": "jpeft"} for name in names]
        return web.json_response({"object": "list", "data": data})

    async def load_adapter(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name, path = text_field(body, "name"), text_field(body, "path")
        if name == self.base_name:
            raise RequestError(400, f"{name!r} is the base model's name", "name")
        try:
            await self.in_worker(self.engine.load, name, path)
        except (OSError, ValueError) as err:
            message = f"cannot load adapter {name!r} from {path}: {err}"
            raise RequestError(400, message, "path") from None
        return web.json_response({"loaded": name}, status=201)

    async def unload_adapter(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await self.in_worker(self.engine.unload, name)
        except KeyError:
            raise RequestError(404, f"no adapter {name!r} is loaded", "name") from None
        return web.json_response({"unloaded": name})

    # -- batching ------------------------------------------------------------------------------

    async def batches(self) -> None:
        """Collect the requests of one window, answer them with one generate call, repeat."""
        while True:
            batch = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + self.batch_window
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(timeout, 0)))
                except TimeoutError:
                    break
            requests, futures = zip(*batch, strict=True)
            try:
                results = await self.in_worker(self.engine.generate, list(requests))
            except Exception as err:  # noqa: BLE001 (a failed batch must not stop the server)
                for future in futures:
                    if not future.done():
                        future.set_exception(
                            RequestError(500, f"generation failed: {type(err).__name__}: {err}")
                        )
                continue
            for future, result in zip(futures, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def in_worker(self, fn, *args) -> Any:
        """`fn(*args)` in the one worker thread (generation and adapter changes, in turn)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string", "prompt")
        ids = list(self.engine.tokenizer(prompt)["input_ids"])
        if not ids:
            raise RequestError(400, "the prompt has no tokens", "prompt")
        return ids


async def json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def positive_int(body: dict, field: str, default: int) -> int:
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(400, f"{field} must be an integer >= 1, got {value!r}", field)
    return value


def text_field(body: dict, field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise RequestError(400, f"{field} must be a non-empty string, got {value!r}", field)
    return value
