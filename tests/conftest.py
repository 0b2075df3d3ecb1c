"""Every test process sees 8 CPU devices, so the sharding tests can build a (2, 2, 2) mesh.

Set before JAX starts; unsharded code still runs on the first device, as on a one-device host.
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}".strip()


import numpy as np  # noqa: E402  (after setting the flag, before anything starts JAX)
import pytest  # noqa: E402
from tiny_models import TOPIC_WORDS, TOPICS, WORDS, save_word_level_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved as a HF directory."""
    return save_word_level_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def topic_csv(tmp_path_factory):
    """150 rows of text,label: three topics, each told by its words."""
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for _ in range(150):
        topic = TOPICS[rng.integers(3)]
        words = rng.choice(TOPIC_WORDS[topic], 6).tolist() + rng.choice(WORDS[:2], 2).tolist()
        rows.append(f"{' '.join(rng.permutation(words))},{topic}")
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    path.write_text("\n".join(rows))
    return path
