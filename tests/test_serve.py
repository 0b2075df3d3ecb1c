"""`jpeft serve`, for real: the aiohttp server on localhost, concurrent requests over HTTP.

Concurrent completions for different adapters are batched into mixed-adapter generate calls and
each answer equals generating that prompt alone with its adapter; bad requests get a 4xx naming
the problem and the server keeps serving; adapters load and unload at run time.
"""

from __future__ import annotations

import asyncio

import aiohttp
import jax
import numpy as np
import pytest
from tiny_models import save_word_level_llama

import jpeft
from jpeft.serve.app import BackgroundServer, make_app
from jpeft.serve.engine import Engine

PROMPTS = ["market vote film", "film film", "vote", "market market vote vote"]


def saved_lora(params, directory, targets, seed):
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    adapter = jax.tree.map(lambda x: x + 0.5 * rng.standard_normal(x.shape, np.float32), adapter)
    jpeft.save_pretrained(adapter, directory)
    return adapter


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, engine, {name: adapter}, adapter folders) of a server running in a thread."""
    root = tmp_path_factory.mktemp("serve")
    path = save_word_level_llama(root / "model")
    model, params = jpeft.models.from_pretrained(path)
    folders = {"a": root / "a", "b": root / "b", "c": root / "c"}
    adapters = {
        "a": saved_lora(params, folders["a"], ["q_proj", "v_proj"], 1),
        "b": saved_lora(params, folders["b"], ["up_proj", "down_proj"], 2),
        "c": saved_lora(params, folders["c"], ["o_proj"], 3),
    }
    engine = Engine(model, params, jpeft.models.load_tokenizer(path), max_batch=8)
    engine.load("a", folders["a"])
    engine.load("b", folders["b"])
    with BackgroundServer(make_app(engine, "tiny", batch_window=0.2)) as url:
        yield url, engine, adapters, folders


def send(url: str, calls: list[tuple[str, str, object]]) -> list[tuple[int, dict]]:
    """(status, JSON body) of each (method, path, body) call, all sent at once."""

    async def one(session, method, route, body):
        kwargs = {"data": body} if isinstance(body, str) else {"json": body}
        async with session.request(method, url + route, **kwargs) as response:
            return response.status, await response.json()

    async def every():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session, *call) for call in calls))

    return asyncio.run(every())


def alone(engine, adapter, prompt: str, max_tokens: int) -> str:
    """The text greedy generation gives for `prompt` alone."""
    ids = np.asarray([engine.tokenizer(prompt)["input_ids"]])
    out = np.asarray(engine.model.generate(engine.params, ids, max_tokens, adapter=adapter))
    new = [int(t) for t in out[0, ids.shape[1] :]]
    eos = engine.tokenizer.eos_token_id
    new = new[: new.index(eos)] if eos in new else new
    return engine.tokenizer.decode(new, skip_special_tokens=True)


def test_concurrent_requests_are_batched_and_equal_alone(server):
    url, engine, adapters, _ = server
    models = ["a", "b", "tiny", "a", "b", "tiny", "a", "b"]
    calls = [
        ("POST", "/v1/completions", {"model": m, "prompt": PROMPTS[i % 4], "max_tokens": 3 + i})
        for i, m in enumerate(models)
    ]
    before = len(engine.batch_sizes)
    results = send(url, calls)
    assert max(engine.batch_sizes[before:]) > 1, "concurrent requests were not batched"
    for (_, _, body), (status, answer) in zip(calls, results, strict=True):
        assert status == 200, answer
        adapter = None if body["model"] == "tiny" else adapters[body["model"]]
        want = alone(engine, adapter, body["prompt"], body["max_tokens"])
        assert answer["choices"][0]["text"] == want, body
        assert answer["usage"]["completion_tokens"] <= body["max_tokens"]
    texts = {a["choices"][0]["text"] for _, a in results[:3]}
    assert len(texts) > 1, "the adapters change nothing"


@pytest.mark.parametrize(
    "body, status, match",
    [
        ({"model": "nope", "prompt": "vote"}, 404, "'nope' is not served"),
        ('{"model": "a", "prompt": ', 400, "not valid JSON"),
        ({"model": "a"}, 400, "prompt must be a non-empty string"),
        ({"model": "a", "prompt": "vote", "max_tokens": 0}, 400, "max_tokens must be"),
        ({"model": "a", "prompt": "vote", "max_tokens": 10_000}, 400, "exceed the model's"),
        ({"model": "a", "prompt": "vote", "temperature": 0.7}, 400, "greedily"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, body, status, match):
    url = server[0]
    good = {"model": "a", "prompt": "vote", "max_tokens": 2}
    (got, answer), (after, _) = send(
        url, [("POST", "/v1/completions", body), ("POST", "/v1/completions", good)]
    )
    assert got == status and match in answer["error"]["message"], answer
    assert after == 200


def test_adapters_load_and_unload_at_run_time(server, tmp_path):
    url, engine, adapters, folders = server
    request = {"model": "c", "prompt": "market vote", "max_tokens": 4}
    [(status, _)] = send(url, [("POST", "/v1/completions", request)])
    assert status == 404
    [(status, _)] = send(url, [("POST", "/v1/adapters", {"name": "c", "path": str(folders["c"])})])
    assert status == 201
    [(status, answer), (_, listing)] = send(
        url, [("POST", "/v1/completions", request), ("GET", "/v1/models", None)]
    )
    assert status == 200
    assert answer["choices"][0]["text"] == alone(engine, adapters["c"], "market vote", 4)
    assert [m["id"] for m in listing["data"]] == ["tiny", "a", "b", "c"]
    ia3 = tmp_path / "ia3"
    config = jpeft.IA3Config(target_modules=["v_proj"], feedforward_modules=[])
    jpeft.save_pretrained(jpeft.init_adapter(engine.params, config, key=jax.random.key(0)), ia3)
    refused = send(
        url,
        [
            ("POST", "/v1/adapters", {"name": "c", "path": str(folders["c"])}),
            ("POST", "/v1/adapters", {"name": "d", "path": str(ia3)}),
            ("POST", "/v1/adapters", {"name": "e", "path": str(tmp_path / "missing")}),
        ],
    )
    assert [s for s, _ in refused] == [400, 400, 400]
    assert "already served" in refused[0][1]["error"]["message"]
    assert "not a LoRA adapter" in refused[1][1]["error"]["message"]
    [(status, _)] = send(url, [("DELETE", "/v1/adapters/c", None)])
    assert status == 200
    [(status, _)] = send(url, [("POST", "/v1/completions", request)])
    assert status == 404
