"""`jpeft finetune --report-to` and the model card of a saved adapter folder.

One short run reports to TensorBoard and W&B (offline); each dashboard is read back with its own
library's reader (TensorBoard's EventAccumulator, `wandb leet inspect`) and must hold what the
job logged. The card is read with a YAML parser and huggingface_hub's, and the folder it is in
must still load in PEFT and jpeft.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import yaml
from job_helpers import job_args, run_cli_error

import jpeft
from jpeft import cli
from jpeft.finetune.options import FinetuneConfig, JobError
from jpeft.finetune.outputs import MARKER
from jpeft.finetune.reporting import open_reporters
from jpeft.finetune.stopping import RunStopped
from jpeft.model_card import END, START

STEPS, WARMUP = 4, 2


@pytest.fixture(scope="module")
def reported(tiny_checkpoint, topic_csv, tmp_path_factory):
    """One short run with `--report-to tensorboard,wandb` in a new working folder, W&B offline:
    (its metrics.json, its output folder, its dashboards' folder)."""
    work = tmp_path_factory.mktemp("work")
    flags = ("--steps", STEPS, "--warmup-steps", WARMUP, "--report-to", "tensorboard,wandb")
    with pytest.MonkeyPatch.context() as env:
        env.chdir(work)
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.delenv("WANDB_DIR", raising=False)
        assert cli.main(job_args(tiny_checkpoint, topic_csv, work / "out", *flags)) == 0
    (folder,) = (work / "runs").iterdir()
    return json.loads((work / "out" / "metrics.json").read_text()), work / "out", folder


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard's own reader sees the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def tensorboard_hparams(folder: Path) -> dict:
    """The run config of the HParams dashboard's session-start record."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    hparams = metadata.parse_session_start_info_plugin_data(content).hparams
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in hparams.items()}


def wandb_records(folder: Path) -> list[dict]:
    """The records of the one W&B run under `folder`, read by W&B's own reader."""
    (run,) = folder.glob("**/offline-run-*")
    command = [sys.executable, "-m", "wandb", "leet", "inspect", str(run), "--json"]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in lines.splitlines()]


def f32(values) -> list[float]:
    """What a TensorBoard scalar holds of each value (a float32)."""
    return [float(np.float32(v)) for v in values]


def expected_learning_rates(lr: float) -> list[float]:
    """The learning rate of each step: AdamW's warm-up from 0 then cosine decay to 0."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, WARMUP, STEPS)
    return [float(schedule(i)) for i in range(STEPS)]


def test_tensorboard_holds_what_the_job_logged(reported):
    metrics, _, folder = reported
    assert folder.parent.name == "runs" and folder.name.endswith("-lora")  # runs/<date-time>-lora
    scalars = tensorboard_scalars(folder)
    steps = list(range(1, STEPS + 1))
    assert scalars["train/loss"] == list(zip(steps, f32(metrics["loss"]), strict=True))
    lrs = expected_learning_rates(metrics["config"]["lr"])
    assert scalars["train/learning_rate"] == list(zip(steps, f32(lrs), strict=True))
    assert lrs[0] == 0 and max(lrs) == pytest.approx(metrics["config"]["lr"])
    throughput = scalars["train/tokens_per_second"]
    assert [s for s, _ in throughput] == steps and all(v > 0 for _, v in throughput)
    assert throughput[-1][1] == f32([metrics["tokens_per_second"]])[0]
    before, after = metrics["accuracy_before"], metrics["accuracy_after"]
    assert scalars["eval/accuracy"] == [(0, *f32([before])), (STEPS, *f32([after]))]
    for name in ("trainable_params", "total_params", "train_seconds", "accuracy_after"):
        assert scalars[name] == [(STEPS, *f32([metrics[name]]))], name

    hparams = tensorboard_hparams(folder)
    assert set(hparams) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    for name, value in metrics["config"].items():
        shown = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        assert hparams[name] == shown, name


def test_wandb_holds_what_the_job_logged(reported):
    metrics, _, folder = reported
    records = wandb_records(folder)
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if "history" in r}
    assert sorted(history) == list(range(STEPS + 1))
    lrs = expected_learning_rates(metrics["config"]["lr"])
    for step in range(1, STEPS + 1):
        row = history[step]
        assert row["train/loss"] == metrics["loss"][step - 1]
        assert row["train/learning_rate"] == pytest.approx(lrs[step - 1], abs=1e-9)
        assert row["train/tokens_per_second"] > 0
    assert history[0]["eval/accuracy"] == metrics["accuracy_before"]
    assert history[STEPS]["eval/accuracy"] == metrics["accuracy_after"]

    (run,) = [r["run"] for r in records if r["type"] == "run"]
    config = {k: v for k, v in run["config"]["update"].items() if not k.startswith("_")}
    assert config == metrics["config"]  # every option, the model's path included
    summary = {}
    for record in records:
        summary |= record.get("summary", {}).get("update", {})
    for name in ("accuracy_before", "accuracy_after", "trainable_params", "total_params"):
        assert summary[name] == metrics[name], name
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B API key anywhere (environment, .netrc, settings) and no WANDB_MODE; a fresh W&B
    session, so that it reads these settings."""
    import wandb

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "30")  # a failure, never a hang
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.mark.parametrize(
    "stop", [RunStopped("step 2: the loss is not finite", 1), KeyboardInterrupt()], ids=repr
)
def test_a_stopped_run_keeps_its_logs_and_ends_as_failed(stop, tmp_path, no_wandb_login):
    """The dashboards are closed (flushed) however the run ends; without an API key the W&B run
    is an offline one, not a login prompt."""
    logged = []
    dashboards = ["tensorboard", "wandb"]
    with pytest.raises(type(stop)):
        with open_reporters(dashboards, tmp_path / "run", {"r": 4}, logged.append) as reporter:
            reporter.log(1, {"train/loss": 2.5})
            raise stop
    assert tensorboard_scalars(tmp_path / "run") == {"train/loss": [(1, 2.5)]}
    records = wandb_records(tmp_path / "run")
    assert [r["history"]["item"]["train/loss"] for r in records if r["type"] == "history"] == [2.5]
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [1]
    assert any(line.startswith("wandb: offline run in") for line in logged), logged


def test_a_setting_wandb_refuses_is_a_one_line_error(tmp_path, no_wandb_login, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(JobError, match="--report-to wandb: W&B could not start a run: .*mode"):
        with open_reporters(["tensorboard", "wandb"], tmp_path / "run", {}, print):
            pass


def test_each_run_gets_a_new_folder(tmp_path):
    for _ in range(2):
        with open_reporters(["tensorboard"], tmp_path / "runs" / "x-lora", {}, print) as r:
            r.log(1, {"a": 1.0})
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x-lora", "x-lora-2"]


BAD_REPORTING = [
    (("--report-to", "tensorflow"), "--report-to 'tensorflow': choose from tensorboard, wandb"),
    (("--report-to", "none,wandb"), "'none' cannot go with other dashboards"),
    (("--report-to", ""), "--report-to '': choose from"),
    (("--logging-dir", ""), "--logging-dir is empty"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_REPORTING, ids=lambda x: str(x)[:30])
def test_bad_reporting_options_are_one_line_errors(flags, message, tmp_path, capsys):
    err = run_cli_error(["finetune", "--output-dir", str(tmp_path / "out"), *flags], capsys)
    assert message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_dashboard_package_names_the_extra(package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    out = tmp_path / "out"
    args = ["finetune", "--model", "/nowhere", "--report-to", package, "--output-dir", str(out)]
    err = run_cli_error(args, capsys)
    assert (
        f"--report-to {package} needs the {package} package: pip install 'jpeft[{package}]'" in err
    )


def test_logging_dir_must_be_a_folder_outside_the_output(tiny_checkpoint, tmp_path, capsys):
    out, a_file = tmp_path / "out", tmp_path / "notes.txt"
    a_file.write_text("x")
    base = ["finetune", "--model", str(tiny_checkpoint), "--output-dir", str(out)]
    for logging_dir, message in [(out / "runs", "is inside --output-dir"), (a_file, "is a file")]:
        args = [*base, "--report-to", "tensorboard", "--logging-dir", str(logging_dir)]
        assert message in run_cli_error(args, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# the model card


def read_card(folder: Path) -> tuple[dict, str]:
    """(front matter, text) of folder/README.md, the front matter read by YAML and by
    huggingface_hub's model card reader alike."""
    from huggingface_hub import ModelCard

    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    data = yaml.safe_load(front)
    assert ModelCard.load(folder / "README.md").data.to_dict() == data
    return data, body


def test_the_job_adapter_has_a_card_with_its_metrics(reported, tiny_checkpoint):
    metrics, out, _ = reported
    data, body = read_card(out / "adapter")
    assert data["base_model"] == str(tiny_checkpoint) and data["library_name"] == "peft"
    assert {"lora", "jpeft"} <= set(data["tags"]) and data["pipeline_tag"] == "text-generation"
    assert "`LORA` (`LoraConfig`)" in body and "- `r`: `4`" in body
    assert f"trainable parameters: {metrics['trainable_params']:,}" in body
    for name in ("accuracy_before", "accuracy_after", "steps", "lr", "train_seconds"):
        assert f"| {name} |" in body, name
    assert "PeftModel.from_pretrained" in body and "jpeft.load_pretrained" in body
    assert "adapter/README.md" in json.loads((out / MARKER).read_text())["files"]


def test_the_card_does_not_stop_peft_from_loading_the_folder(reported, tiny_checkpoint):
    import peft
    import transformers

    _, out, _ = reported
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model = peft.PeftModel.from_pretrained(base, out / "adapter")
    assert model.peft_config["default"].r == 4


def tiny_adapter(seed: int = 0, **config) -> jpeft.Adapter:
    params = {"model": {"layers": {"0": {"q_proj": {"weight": np.ones((8, 8), np.float32)}}}}}
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj"], **config)
    return jpeft.init_adapter(params, config, key=jax.random.key(seed))


def test_an_existing_card_keeps_its_text_and_tags(tmp_path):
    mine = "---\nlicense: mit\ntags:\n- mine\n---\n# My adapter\n\nMy notes.\n"
    (tmp_path / "README.md").write_text(mine)
    for accuracy in (0.5, 0.75):  # the second save rewrites jpeft's section only
        jpeft.save_pretrained(tiny_adapter(), tmp_path, metrics={"accuracy": accuracy})
    data, body = read_card(tmp_path)
    assert data["license"] == "mit" and data["tags"] == ["jpeft", "lora", "mine"]
    assert body.startswith("# My adapter\n\nMy notes.\n")
    assert body.count(START) == body.count(END) == 1
    assert "| accuracy | 0.75 |" in body and "0.5 |" not in body


@pytest.mark.parametrize("front", ["---\nfoo: [\n---\n", "---\n- a list\n---\n"])
def test_a_card_that_does_not_parse_stops_the_save_before_any_write(front, tmp_path):
    (tmp_path / "README.md").write_text(front + "text\n")
    with pytest.raises(ValueError, match="README.md: its YAML front matter"):
        jpeft.save_pretrained(tiny_adapter(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_several_adapters_get_one_card_at_the_top(tmp_path):
    adapters = {"default": tiny_adapter(0), "sql": tiny_adapter(1, lora_alpha=16)}
    jpeft.save_pretrained(adapters, tmp_path, metrics={"steps": 3})
    _, body = read_card(tmp_path)
    assert "## Adapter `default`" in body and "## Adapter `sql`" in body
    assert 'load_adapter("path/to/this/folder/sql", adapter_name="sql")' in body
    assert not (tmp_path / "sql" / "README.md").exists()
    loaded = jpeft.load_pretrained(tmp_path)
    assert sorted(loaded) == ["default", "sql"] and loaded["sql"].config.lora_alpha == 16
