"""kohya's --log_with tensorboard: a run writes its step records as TensorBoard scalars (read back with
TensorBoard's own reader), a resumed run continues the curves, and an overwrite removes them with the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_train import write_dataset

from lorakit.cli import main


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(folder))
    mux.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in mux.Scalars(run, tag))
    return {tag: sorted(values) for tag, values in out.items()}


def test_a_run_logs_to_tensorboard_and_a_resumed_run_continues_the_curves(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir), "--out",
             str(out), "--no-progress", "--set", "output.log_with=tensorboard", "--early-stop", "report"]
    assert main([*flags, "--epochs", "1"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    scalars = _scalars(out / "logs")
    # every step's loss, learning rate and CS, at its step, as in log.jsonl
    assert [s for s, _ in scalars["loss"]] == [r["step"] for r in steps]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [v for _, v in scalars["lr"]] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
    assert len(scalars["cs"]) == sum("cs" in r for r in steps) > 0
    assert main([*flags, "--epochs", "2", "--resume"]) == 0
    resumed = _scalars(out / "logs")["loss"]
    assert [s for s, _ in resumed] == list(range(1, 2 * len(steps) + 1))  # continued, nothing repeated
    capsys.readouterr()
    # the run owns its logs: an overwrite removes them with the rest
    assert main([*flags, "--epochs", "1", "--set", "output.if_exists=overwrite"]) == 0
    assert [s for s, _ in _scalars(out / "logs")["loss"]] == [r["step"] for r in steps]


def test_an_unknown_tracker_is_refused_before_the_run(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "run"), "--set", "output.log_with=comet", "--no-progress"]) == 2
    assert "output.log_with" in capsys.readouterr().err and not (tmp_path / "run").exists()


def _wandb_records(run_dir: Path) -> list:
    """The records of a W&B offline run (its ``run-<id>.wandb`` file: W&B's LevelDB-style log of protobuf
    records, 32 KiB blocks of chunks with a 7-byte header: CRC, length, kind), as ``wandb sync`` would upload."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _wandb_history(run_dir: Path) -> list[dict[str, object]]:
    rows = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path_factory):
    """W&B offline, with its caches and settings in a temporary folder (not the user's home); child processes
    inherit it."""
    pytest.importorskip("wandb")
    home = tmp_path_factory.mktemp("wandb-home")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CACHE_DIR", home / "cache"),
                        ("WANDB_CONFIG_DIR", home / "config"), ("WANDB_DATA_DIR", home / "data")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_a_run_logs_to_wandb_offline_with_its_samples_and_a_resumed_run_continues_it(
        tiny_model_dir, tmp_path, wandb_offline, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\nzkz shape, blue --w 64 --h 64 --d 2 --s 2\n")
    out = tmp_path / "run"
    flags = ["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir), "--out",
             str(out), "--no-progress", "--set", "output.log_with=wandb", "--set", f"sample.prompts='{prompts}'",
             "--set", "output.log_tracker_name=my-project", "--set", "output.wandb_run_name=first try",
             "--early-stop", "report"]
    assert main([*flags, "--epochs", "1"]) == 0
    run_id = json.loads((out / "wandb-run.json").read_text())["id"]
    (first,) = (out / "logs" / "wandb").glob(f"offline-run-*-{run_id}")
    records = _wandb_records(first)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (started.project, started.display_name, started.run_id) == ("my-project", "first try", run_id)
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in steps if "loss" in r}
    history = _wandb_history(first)
    logged = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert logged == pytest.approx(losses, rel=1e-6)
    (samples,) = [row for row in history if "samples/_type" in row]
    assert samples["_step"] == max(losses) and samples["samples/captions"] == ["a zkz shape", "zkz shape, blue"]
    assert len(list((first / "files" / "media" / "images").glob("samples_*.png"))) == 2
    # the run's settings as the W&B run's config
    configs = [item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update]
    assert "network.rank" in configs

    assert main([*flags, "--epochs", "2", "--resume"]) == 0
    assert json.loads((out / "wandb-run.json").read_text())["id"] == run_id  # the same W&B run, continued
    second = [d for d in (out / "logs" / "wandb").glob(f"offline-run-*-{run_id}") if d != first]
    assert len(second) == 1
    resumed = [row["_step"] for row in _wandb_history(second[0]) if "loss" in row]
    assert resumed == [s + max(losses) for s in sorted(losses)]  # from the checkpoint on, nothing repeated
    capsys.readouterr()
    # the run owns its W&B files: an overwrite removes them with the rest, and starts a new W&B run
    assert main([*flags, "--epochs", "1", "--set", "output.if_exists=overwrite"]) == 0
    assert json.loads((out / "wandb-run.json").read_text())["id"] != run_id
    assert not list((out / "logs" / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_without_a_login_or_with_a_key_in_the_config_is_refused_before_the_run(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    flags = ["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir),
             "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*flags, "--set", "output.log_with=all"]) == 2
    err = capsys.readouterr().err
    assert "wandb login" in err and "WANDB_MODE=offline" in err and not (tmp_path / "run").exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / "netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from lorakit.trackers import wandb_can_log

    assert wandb_can_log()  # a `wandb login` is enough
    assert main([*flags, "--set", "output.wandb_api_key=0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert "wandb_api_key" in err and "WANDB_API_KEY" in err and not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_tracker_files(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "run"), "--set", "output.log_with=tensorboard", "--no-progress",
                 "--network-weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err and not (tmp_path / "run").exists()


class _FailingScorer:
    """A user's sample scorer that breaks on the base model's images (the first thing scored)."""

    name = "fail-test"
    types = ("alter", "agnostic")

    def __call__(self, images, prompts) -> float:
        raise RuntimeError("the scorer broke")


def test_tracker_files_of_a_run_that_fails_on_its_first_sample_score_are_the_runs(tiny_model_dir, tmp_path):
    from test_earlystop_samples import PROMPTS
    from test_train import make_config, run_train

    from lorakit.earlystop.samples import register_sample_scorer
    from lorakit.run_manifest import RunManifest

    register_sample_scorer("fail-test", lambda path: _FailingScorer())
    (tmp_path / "p.toml").write_text(PROMPTS)
    out = tmp_path / "run"
    cfg = make_config(tiny_model_dir, write_dataset(tmp_path / "data"), out,
                      early_stop={"mode": "cs-fluctuation", "samples": "fail-test",
                                  "sample_prompts": str(tmp_path / "p.toml")},
                      output={"log_with": "tensorboard"})
    with pytest.raises(RuntimeError, match="the scorer broke"):
        run_train(cfg)
    written = [p for p in (out / "logs").rglob("*") if p.is_file()]
    manifest = RunManifest(out)
    assert written and all(manifest.owns(p) for p in written)  # an overwrite removes them with the rest


@pytest.mark.extended  # 26 s of a killed run; the overwrite rule is tested in test_train_faults (-m extended)
def test_a_killed_run_owns_its_tracker_files_so_an_overwrite_removes_them(tmp_path, wandb_offline):
    """kill -9 in the middle of a run logging to TensorBoard and W&B (offline): the files the trackers opened were
    recorded as they started and at the epoch's end, so --overwrite removes them and keeps nothing back."""
    import signal

    from test_train_faults import run, start_and_signal, train_cmd

    data = write_dataset(tmp_path / "data", n=4, repeats=3)  # 12 steps an epoch at batch size 1
    out = tmp_path / "run"
    killed = start_and_signal(train_cmd(data, out, "--set", "output.log_with=all", steps=200), out, 14,
                              signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    first_id = json.loads((out / "wandb-run.json").read_text())["id"]
    assert list((out / "logs" / "wandb").glob(f"offline-run-*-{first_id}"))
    again = run(train_cmd(data, out, "--set", "output.log_with=all", "--overwrite", steps=2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "overwrite: kept" not in again.stdout  # nothing of the killed run was left as "not lorakit's"
    assert not list((out / "logs" / "wandb").glob(f"offline-run-*-{first_id}"))
    new_id = json.loads((out / "wandb-run.json").read_text())["id"]
    assert new_id != first_id and list((out / "logs" / "wandb").glob(f"offline-run-*-{new_id}"))


def test_a_tracker_settings_file_reaches_the_tracker(tiny_model_dir, tmp_path, monkeypatch):
    """kohya's --log_tracker_config: each tracker's table is passed to it as it starts (TensorBoard's writer names
    its event file with filename_suffix); a relative path is read from the current folder, as every path of a
    config, and the run's config.toml keeps it absolute (a resume from elsewhere finds it)."""
    folder = tmp_path / "job"
    folder.mkdir()
    monkeypatch.chdir(folder)
    (folder / "trackers.toml").write_text('[tensorboard]\nfilename_suffix = ".zkz"\nflush_secs = 5\n')
    (folder / "job.toml").write_text(
        f'[model]\nbase = "{tiny_model_dir}"\n[data]\ntrain_data = "{write_dataset(tmp_path / "data")}"\n'
        f'[training]\nmax_epochs = 1\n[early_stop]\nmode = "off"\n'
        f'[output]\ndir = "{tmp_path / "run"}"\nlog_with = "tensorboard"\nlog_tracker_config = "trackers.toml"\n')
    assert main(["train", str(folder / "job.toml"), "--no-progress"]) == 0
    # the run's writer (its hyperparameters go to a writer of accelerate's own, in a subfolder)
    events = list((tmp_path / "run" / "logs" / "lorakit").glob("events.out.tfevents.*"))
    assert events and all(e.name.endswith(".zkz") for e in events)
    assert _scalars(tmp_path / "run" / "logs")["loss"]
    recorded = (tmp_path / "run" / "config.toml").read_text()
    assert f'log_tracker_config = "{folder / "trackers.toml"}"' in recorded


@pytest.mark.parametrize(("content", "log_with", "says"), [
    ("[tensorboard\nflush_secs = 5\n", "tensorboard", "not a TOML file"),
    ("wandb = 3\n", "tensorboard", "wandb = 3: each tracker's settings are a table"),
    ("[wandb]\nentity = \"team\"\n", "tensorboard", r"\[wandb\] is not a tracker this run writes \(output\.log_with "
                                                    "= 'tensorboard': tensorboard\\)"),
    ("[tensorbord]\nflush_secs = 5\n", "tensorboard", r"\[tensorbord\] is not a tracker this run writes"),
    ("[wandb]\nid = \"abc\"\n", "wandb", r"\[wandb\] id: lorakit sets them, so that a resumed run continues"),
    (None, "tensorboard", "no such file"),
], ids=["not-toml", "not-a-table", "tracker-not-written", "misspelt", "wandb-id", "missing"])
def test_a_bad_tracker_settings_file_is_refused_before_the_run(tiny_model_dir, tmp_path, capsys, wandb_offline,
                                                              content, log_with, says):
    settings = tmp_path / "trackers.toml"
    if content is not None:
        settings.write_text(content)
    flags = ["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir), "--out",
             str(tmp_path / "run"), "--set", f"output.log_with={log_with}", "--set",
             f"output.log_tracker_config={settings}", "--no-progress"]
    for extra in ([], ["--dry-run"]):  # the dry run refuses it as the run does
        assert main([*flags, *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(says, err, flags=re.I) and "log_tracker_config" in err, err
        assert not (tmp_path / "run").exists()
