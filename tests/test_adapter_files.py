"""Adapter files checked against themselves on load, and written whole and readable.

`load_pretrained` refuses, with a ValueError naming the field or the tensor, an adapter_config.json
whose field types are wrong and a safetensors file that disagrees with its config (ranks, DoRA
magnitudes, prompt rows, missing or unknown pieces) or holds non-float or non-finite tensors.
Adapters come from each method's registry entry, as in the conformance suite; a property test
fuzzes valid files of several methods and accepts only a clear error or a working adapter.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file
from test_conformance import base, fresh  # noqa: F401 (base: the tiny Llama fixture)

import jpeft
from jpeft.method import PREFIX, config_from_dict
from jpeft.peft_format import CONFIG_NAME, WEIGHTS_NAME

Q_PROJ = "model.layers.0.self_attn.q_proj"
DOWN_PROJ = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """{variant: (adapter_config.json contents, {key: array})} of a saved adapter per method
    (and a DoRA LoRA), built as `jpeft finetune` builds them."""
    _, _, params, _ = base
    adapters = {
        name: fresh(base, name)
        for name in ("lora", "ia3", "loha", "lokr", "adalora", "prompt-tuning", "prefix-tuning")
    }
    dora = jpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    adapters["dora"] = jpeft.init_adapter(params, dora, key=jax.random.key(0))
    out = {}
    for name, adapter in adapters.items():
        directory = tmp_path_factory.mktemp(name)
        jpeft.save_pretrained(adapter, directory)
        data = json.loads((directory / CONFIG_NAME).read_text())
        out[name] = (data, load_file(directory / WEIGHTS_NAME))
    return out


def write(directory: Path, data, tensors) -> Path:
    """An adapter directory holding `data` as adapter_config.json and `tensors`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(data))
    save_file(dict(tensors), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_error(tmp_path, data, tensors) -> str:
    """The ValueError message of loading `data` + `tensors` (which must fail)."""
    with pytest.raises(ValueError) as info:
        jpeft.load_pretrained(write(tmp_path / "adapter", data, tensors))
    return str(info.value)


def piece_key(module: str, piece: str) -> str:
    return f"{PREFIX}{module}.{piece}"


# ---------------------------------------------------------------------------------------------
# one test per class of fault


@pytest.mark.parametrize(
    "name, field, value, wants",
    [
        ("lora", "r", "4", "an integer"),
        ("lora", "r", 4.0, "write r=4"),
        ("lora", "r", True, "an integer"),
        ("lora", "lora_alpha", "8", "a finite number"),
        ("lora", "lora_dropout", None, "a finite number"),
        ("lora", "use_rslora", 1, "true or false"),
        ("lora", "target_modules", ["q_proj", 3], "a string, a list of strings or null"),
        ("lora", "rank_pattern", {"q_proj": 2.5}, "a dict of strings to integers"),
        ("lora", "alpha_pattern", {"q_proj": "x"}, "a dict of strings to numbers"),
        ("lora", "layers_to_transform", [0, "1"], "a list of integers"),
        ("ia3", "feedforward_modules", {"down_proj": 1}, "a list of strings"),
        ("loha", "alpha", [8], "a finite number"),
        ("adalora", "rank_pattern", {f"{Q_PROJ}.lora_E": [1, 0]}, "lists of true/false"),
        ("prompt-tuning", "num_virtual_tokens", "3", "an integer"),
        ("prompt-tuning", "token_dim", 32.0, "write token_dim=32"),
        ("prompt-tuning", "base_model_name_or_path", {"path": "x"}, "a string or null"),
    ],
)
def test_config_field_types_are_checked(files, tmp_path, name, field, value, wants):
    """In the file (the message names it) and in Python alike: field, value, expected type."""
    data, tensors = files[name]
    message = load_error(tmp_path, {**data, field: value}, tensors)
    assert str(tmp_path / "adapter" / CONFIG_NAME) in message
    config_class = jpeft.registered()[name].config_class
    assert f"{config_class.__name__}.{field} must be" in message and wants in message
    assert repr(value) in message
    with pytest.raises(ValueError, match=re.escape(f"{config_class.__name__}.{field} must be")):
        config_class(**{field: value})


@pytest.mark.parametrize(
    "name, changes, module, piece, config_value",
    [
        ("lora", {"r": 8}, DOWN_PROJ, "lora_A.weight", "r=8"),
        ("lora", {"rank_pattern": {"down_proj": 2}}, DOWN_PROJ, "lora_A.weight", "=2"),
        ("loha", {"r": 2}, DOWN_PROJ, "hada_w1_a", "r=2"),
        ("lokr", {"r": 2}, DOWN_PROJ, "lokr_w2_a", "r=2"),
        ("adalora", {"init_r": 6}, DOWN_PROJ, "lora_A", "init_r=6"),
        ("ia3", {"feedforward_modules": []}, DOWN_PROJ, "ia3_l", "feedforward_modules=[]"),
    ],
)
def test_ranks_must_match_the_config(files, tmp_path, name, changes, module, piece, config_value):
    """PEFT builds the pieces from the config, so a file whose ranks (or IA3 sides) differ would
    fail there, or worse load with alpha / r of the wrong r: the module, piece and value named."""
    data, tensors = files[name]
    message = load_error(tmp_path, {**data, **changes}, tensors)
    assert module in message and piece in message and config_value in message


@pytest.mark.parametrize("name, use_dora", [("lora", True), ("dora", False)])
def test_dora_must_match_the_magnitudes(files, tmp_path, name, use_dora):
    data, tensors = files[name]
    message = load_error(tmp_path, {**data, "use_dora": use_dora}, tensors)
    assert "lora_magnitude_vector" in message and f"use_dora={use_dora}" in message
    assert "model.layers." in message


@pytest.mark.parametrize(
    "name, changes, shape_text",
    [
        ("prompt-tuning", {"num_virtual_tokens": 5}, "(5, 32)"),
        ("prompt-tuning", {"token_dim": 16}, "(3, 16)"),
        ("prefix-tuning", {"num_layers": 3}, "(3, 96)"),
    ],
)
def test_prompt_rows_must_match_the_config(files, tmp_path, name, changes, shape_text):
    data, tensors = files[name]
    message = load_error(tmp_path, {**data, **changes}, tensors)
    field, value = next(iter(changes.items()))
    assert "prompt_embeddings" in message and f"{field}={value}" in message
    assert shape_text in message


@pytest.mark.parametrize(
    "name, edit, named",
    [
        ("lora", ("drop", piece_key(Q_PROJ, "lora_B.weight")), Q_PROJ),
        ("loha", ("drop", piece_key(DOWN_PROJ, "hada_w2_b")), DOWN_PROJ),
        ("lokr", ("drop", piece_key(DOWN_PROJ, "lokr_w1")), DOWN_PROJ),
        ("lora", ("add", piece_key(Q_PROJ, "lora_C.weight")), piece_key(Q_PROJ, "lora_C.weight")),
        ("lora", ("add", piece_key(Q_PROJ, "lora_A.default")), "lora_A.default"),
        ("ia3", ("add", piece_key(Q_PROJ, "base_layer.bias")), "q_proj.base_layer.bias"),
        ("prompt-tuning", ("add", "prompt_embeddings_2"), "prompt_embeddings_2"),
    ],
)
def test_missing_and_unknown_tensors_are_named(files, tmp_path, name, edit, named):
    data, tensors = files[name]
    action, key = edit
    tensors = dict(tensors)
    if action == "drop":
        del tensors[key]
    else:
        tensors[key] = np.ones((2, 2), np.float32)
    assert named in load_error(tmp_path, data, tensors)


def test_parameter_copies_peft_writes_still_load(files, tmp_path):
    """PEFT's files may hold, besides pieces, copies of base parameters (modules_to_save, a
    resized embedding), trained biases (`base_layer.bias`) and a targeted embedding's own table
    (`base_layer.weight`, skipped): all load, as in PEFT."""
    data, tensors = files["lora"]
    extra = {
        f"{PREFIX}lm_head.weight": np.ones((20, 32), np.float32),
        f"{PREFIX}model.norm.weight": np.ones(32, np.float32),
        piece_key(Q_PROJ, "base_layer.bias"): np.ones(32, np.float32),
        piece_key(Q_PROJ, "base_layer.weight"): np.ones((32, 32), np.float32),
    }
    loaded = jpeft.load_pretrained(write(tmp_path, data, {**tensors, **extra}))
    assert set(loaded.overrides) == {"lm_head.weight", "model.norm.weight", f"{Q_PROJ}.bias"}


@pytest.mark.parametrize("name", ["lora", "prompt-tuning"])
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64])
def test_non_float_tensors_are_refused(files, tmp_path, name, dtype):
    data, tensors = files[name]
    key = sorted(tensors)[0]
    message = load_error(tmp_path, data, {**tensors, key: tensors[key].astype(dtype)})
    assert repr(key) in message and str(np.dtype(dtype)) in message


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt-tuning"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(files, tmp_path, name, bad):
    data, tensors = files[name]
    key = sorted(tensors)[-1]
    value = tensors[key].copy()
    value.flat[-1] = bad
    message = load_error(tmp_path, data, {**tensors, key: value})
    assert repr(key) in message and "NaN or inf" in message


# ---------------------------------------------------------------------------------------------
# saving


def loaded(files, name: str, tmp_path: Path) -> jpeft.Adapter:
    return jpeft.load_pretrained(write(tmp_path / f"loaded-{name}", *files[name]))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_permissions(files, tmp_path, umask):
    adapter = loaded(files, "lora", tmp_path)
    previous = os.umask(umask)
    try:
        jpeft.save_pretrained(adapter, tmp_path / "out")
    finally:
        os.umask(previous)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == ["README.md", CONFIG_NAME, WEIGHTS_NAME]


def test_an_interrupted_save_keeps_the_old_files(files, tmp_path, monkeypatch):
    """The config is written after the weights; a failure on it leaves the old pair as it was
    and no temporary file behind."""
    old, new = loaded(files, "prompt-tuning", tmp_path), loaded(files, "lora", tmp_path)
    tmp_path = tmp_path / "out"
    jpeft.save_pretrained(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    writes = []
    write_new_file = jpeft.peft_format._write_new_file

    def failing_on_the_config(directory, name, content):
        writes.append(name)
        if name == CONFIG_NAME:
            raise OSError("disk full")
        return write_new_file(directory, name, content)

    monkeypatch.setattr(jpeft.peft_format, "_write_new_file", failing_on_the_config)
    with pytest.raises(OSError, match="disk full"):
        jpeft.save_pretrained(new, tmp_path)
    assert writes == [WEIGHTS_NAME, CONFIG_NAME]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# fuzzing: a clear error or a working adapter, nothing else

FUZZED = ("lora", "ia3", "loha", "prompt-tuning")
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([2.5, -1.0, 4.0, 0.0, 0.3, 16.5]),
    st.sampled_from(["", "x", "4", "q_proj", "(", "all-linear", "LORA", "TEXT"]),
    st.lists(st.one_of(st.integers(-1, 2), st.sampled_from(["q_proj", "x"]), st.none())),
    st.dictionaries(
        st.sampled_from(["q_proj", "down_proj", "("]),
        st.one_of(st.integers(-1, 4), st.none(), st.lists(st.booleans(), max_size=2)),
        max_size=2,
    ),
)
DELETE = object()
FLOAT_DTYPES = [np.float16, np.float64, ml_dtypes.bfloat16]
OTHER_DTYPES = [np.int32, np.uint8, np.bool_]


@st.composite
def config_edit(draw, data):
    key = draw(st.sampled_from([*sorted(data), "future_field"]))
    return ("config", key, draw(st.one_of(st.just(DELETE), JUNK)))


@st.composite
def tensor_edit(draw, tensors):
    key = draw(st.sampled_from(sorted(tensors)))
    kind = draw(st.sampled_from(["dtype", "shape", "drop", "rename", "nonfinite"]))
    options = {
        "dtype": st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES),
        "shape": st.sampled_from(["transpose", "lead", "cut_row", "flatten", "scalar"]),
        "drop": st.none(),
        "rename": st.sampled_from(["suffix", "piece", "unprefixed", "default"]),
        "nonfinite": st.sampled_from([np.nan, np.inf, -np.inf]),
    }
    return ("tensor", key, (kind, draw(options[kind])))


@st.composite
def file_edit(draw):
    kind = draw(st.sampled_from(["truncate", "header_dtype", "header_shape"]))
    return ("file", kind, draw(st.floats(0, 1)))


def edit_tensors(tensors: dict, key: str, edit) -> None:
    kind, option = edit
    value = tensors.pop(key)
    if kind == "dtype":
        value = value.astype(option)
    elif kind == "shape":
        value = {
            "transpose": lambda v: v.T,
            "lead": lambda v: v[None],
            "cut_row": lambda v: v[:-1],
            "flatten": lambda v: v.reshape(-1),
            "scalar": lambda v: v.reshape(-1)[0],
        }[option](value)
    elif kind == "nonfinite":
        value = value.astype(np.float32) if value.dtype.kind in "iub" else value.copy()
        value.flat[0] = option
    if kind == "rename":
        key = {
            "suffix": key + "x",
            "piece": key.replace("lora_", "lora_C").replace("ia3_l", "ia3_x").replace("w1", "w3"),
            "unprefixed": key.removeprefix(PREFIX),
            "default": key.replace(".weight", ".default.weight"),
        }[option]
    if kind != "drop":
        tensors[key] = np.ascontiguousarray(value)


BYTES = {"F64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "U8": 1, "F8_E4M3": 1, "XX": 4}
BYTES.update({"I64": 8, "I8": 1, "BOOL": 1, "C64": 8})


def edit_file(path: Path, kind: str, where: float) -> None:
    """Cut the file at `where`, or change one tensor's dtype or shape (reversed) in its JSON
    header, the data as it was."""
    raw = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[: int(where * (len(raw) - 1))])
        return
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    keys = sorted(k for k in header if k != "__metadata__")
    if not keys:
        return
    entry = header[keys[int(where * (len(keys) - 1))]]
    if kind == "header_dtype":  # the last axis resized to keep the bytes where it divides
        dtype, shape = ["I32", "U8", "F16", "F8_E4M3", "XX"][int(where * 4)], entry["shape"]
        row_bytes = BYTES[entry["dtype"]] * shape[-1] if shape else 1
        if shape and row_bytes % BYTES[dtype] == 0:
            entry["shape"] = [*shape[:-1], row_bytes // BYTES[dtype]]
        entry["dtype"] = dtype
    else:
        entry["shape"] = entry["shape"][::-1]
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])


def tensor_names(tensors: dict) -> set[str]:
    """The tensor keys (with and without PEFT's prefix) and modules a message may name."""
    keys = set(tensors) | {k.removeprefix(PREFIX) for k in tensors}
    return keys | {k.rsplit(".", 2)[0] for k in keys} | {k.rsplit(".", 1)[0] for k in keys}


def names_one(message: str, fields: set[str], tensor_names: set[str]) -> bool:
    """Whether `message` names a config field (`Config.r must`, `r=8`, ...), a tensor key or
    module, or the weights file as unreadable or empty."""
    forms = (" {} ", ".{} ", "{}=", "{}[", "'{}'", "`{}`")
    return (
        any(form.format(field) in message for field in fields for form in forms)
        or any(name in message for name in tensor_names)
        or any(file in message for file in (f"{WEIGHTS_NAME} is not", f"{WEIGHTS_NAME} holds"))
    )


@pytest.mark.filterwarnings("ignore:.*ignoring keys unknown to jpeft")
@settings(
    max_examples=16,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.parametrize("name", FUZZED)
@given(choice=st.data())
def test_fuzzed_files_load_clearly_or_work(base, files, tmp_path, name, choice):  # noqa: F811
    """One or two edits of a valid file (config fields, tensors, header or bytes): the load (or
    the apply, which checks the pieces against the model) fails with a ValueError naming a field,
    a tensor or the unreadable file, or the adapter gives finite logits and saves back to the
    same config and tensors. Never another exception."""
    _, model, params, ids = base
    original_data, original_tensors = files[name]
    data, tensors = json.loads(json.dumps(original_data)), dict(original_tensors)
    edits = choice.draw(
        st.lists(
            st.one_of(config_edit(data), tensor_edit(tensors), file_edit()), min_size=1, max_size=2
        )
    )
    for where, key, edit in edits:
        if where == "config" and edit is DELETE:
            data.pop(key, None)
        elif where == "config":
            data[key] = edit
        elif where == "tensor" and key in tensors:
            edit_tensors(tensors, key, edit)
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    (directory / CONFIG_NAME).write_text(json.dumps(data))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    for where, kind, at in sorted(edits, key=lambda edit: edit[1] == "truncate"):
        if where == "file":
            edit_file(directory / WEIGHTS_NAME, kind, at)
    names = tensor_names({**original_tensors, **tensors})

    try:
        loaded = jpeft.load_pretrained(directory)
        logits = np.asarray(model.apply(params, ids, adapter=loaded))
    except (ValueError, FileNotFoundError) as err:
        assert names_one(str(err), set(original_data) | set(data), names), str(err)
        return
    assert np.all(np.isfinite(logits))
    again = tmp_path / f"{directory.name}-again"
    jpeft.save_pretrained(loaded, again)
    resaved = json.loads((again / CONFIG_NAME).read_text())
    assert config_from_dict(resaved) == loaded.config.replace(inference_mode=True)
    written = {k.removeprefix(PREFIX): v for k, v in load_file(again / WEIGHTS_NAME).items()}
    read = {k.removeprefix(PREFIX): v for k, v in load_file(directory / WEIGHTS_NAME).items()}
    assert set(written) == set(read)
    for key, value in written.items():
        np.testing.assert_array_equal(value, read[key].astype(value.dtype), err_msg=key)
