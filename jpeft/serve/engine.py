"""What `jpeft serve` runs: one base model, its LoRA adapters as one bank, batched generation.

`Engine.generate(requests)` answers several completion requests, for any mix of adapters, with
one mixed-adapter `model.generate` call (`jpeft.mixed`): prompts left-padded to one length, each
row through its own adapter ("__base__" for the base model), greedy decoding to the longest
`max_tokens`, each row cut at its own `max_tokens` or its first end-of-sequence token. Shapes are
rounded up (rows to a power of two, prompt and new tokens to multiples of 16), so a running server
compiles a handful of programs, not one per request. Loading or unloading an adapter rebuilds the
bank (a new structure: the next batch compiles again).

Not thread-safe by itself: `jpeft.serve.app` calls it from one worker thread.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.mixed import BASE, MixedAdapters, mix
from jpeft.peft_format import load_pretrained

ROUND = 16


@dataclasses.dataclass(frozen=True)
class Request:
    """A completion request: the prompt's token ids, how many to add, and the adapter (None:
    the base model)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    adapter: str | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """A request's answer: the new token ids and why they end ("stop": end of sequence,
    "length": max_tokens)."""

    token_ids: tuple[int, ...]
    finish_reason: str


class Engine:
    """The model, its parameters and tokenizer, and the LoRA adapters it serves by name."""

    def __init__(self, model: Any, params: Any, tokenizer: Any, max_batch: int = 16):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_batch = max_batch
        self.adapters: dict[str, Any] = {}
        self.bank: MixedAdapters | None = None
        self.batch_sizes: list[int] = []  # rows of every generate call (for tests and logs)

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Read the LoRA adapter at `path` and serve it as `name`; ValueError when it cannot be
        mixed (see `jpeft.mixed`) or the name is taken."""
        if name in self.adapters or name == BASE:
            raise ValueError(f"an adapter named {name!r} is already served; unload it first")
        adapter = load_pretrained(path, self.params)
        if isinstance(adapter, dict):
            raise ValueError(
                f"{path} holds several adapters ({', '.join(adapter)}); load each from its own "
                "folder"
            )
        adapters = {**self.adapters, name: adapter}
        self.bank = mix(adapters, [])  # checks the adapter mixes, before anything changes
        self.adapters = adapters

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(name)
        del self.adapters[name]
        self.bank = mix(self.adapters, []) if self.adapters else None

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """One mixed-adapter generate call for all `requests` (at most `max_batch`)."""
        rows = _round_rows(len(requests), self.max_batch)
        longest = max(len(r.prompt_ids) for r in requests)
        wanted = max(r.max_tokens for r in requests)
        prompt_len, new_tokens = _round_lengths(longest, wanted, self.max_length)
        pad = self.pad_id
        ids = np.full((rows, prompt_len), pad, np.int32)
        mask = np.zeros((rows, prompt_len), np.int32)
        names = [BASE] * rows
        for row, request in enumerate(requests):
            ids[row, prompt_len - len(request.prompt_ids) :] = request.prompt_ids
            mask[row, prompt_len - len(request.prompt_ids) :] = 1
            names[row] = request.adapter or BASE
        ids[len(requests) :, -1], mask[len(requests) :, -1] = pad, 1  # idle rows: one token
        kwargs = {} if self.bank is None else dict(adapter=self.bank, adapter_names=names)
        out = self.model.generate(
            self.params, jnp.asarray(ids), new_tokens, attention_mask=jnp.asarray(mask), **kwargs
        )
        self.batch_sizes.append(len(requests))
        new = np.asarray(out)[:, prompt_len:]
        return [self._completion(new[row], r.max_tokens) for row, r in enumerate(requests)]

    @property
    def pad_id(self) -> int:
        for token in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return int(token)
        return 0

    def _completion(self, new: np.ndarray, max_tokens: int) -> Completion:
        tokens = [int(t) for t in new[:max_tokens]]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in tokens:
            return Completion(tuple(tokens[: tokens.index(eos)]), "stop")
        return Completion(tuple(tokens), "length")


def _round_rows(count: int, max_batch: int) -> int:
    """`count` rows rounded up to a power of two, at most `max_batch`."""
    rows = 1
    while rows < count:
        rows *= 2
    return min(rows, max(max_batch, count))


def _round_lengths(prompt: int, new: int, limit: int) -> tuple[int, int]:
    """(prompt length, new tokens) rounded up to multiples of ROUND within `limit` positions;
    the exact lengths where rounding would not fit (the caller checked those fit)."""
    padded = -(-prompt // ROUND) * ROUND
    more = -(-new // ROUND) * ROUND
    if padded + more <= limit:
        return padded, more
    if padded + new <= limit:
        return padded, new
    return prompt, new
