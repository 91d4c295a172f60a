"""Loggers beside ``metrics.jsonl``: ``train.wandb`` (a Weights & Biases run, offline in the
tests: its ``.wandb`` file is read back and compared with the JSON lines log) and
``train.profile_steps`` (a ``jax.profiler`` trace of the chosen meta-steps)."""

import gzip
import importlib.util
import json
import struct
import zlib
from pathlib import Path

import pytest

from metagrad.experiment import Config, train
from metagrad.experiment.config import ConfigError, validate
from metagrad.experiment.runlog import RunLog, read_log


def tiny(steps=20, **train_kw):
    cfg = Config()
    cfg.model.hidden = [8]
    cfg.train.steps, cfg.train.chunk_steps = steps, 10
    cfg.train.eval_every, cfg.train.checkpoint_every = 10, 10
    cfg.train.meta_batch_size, cfg.train.progress = 4, False
    cfg.eval.tasks, cfg.eval.val_tasks, cfg.eval.curve_steps, cfg.eval.figure = 8, 4, 1, False
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


# --- reading an offline wandb run back ----------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The protobuf ``Record``s of a ``.wandb`` file: wandb's LevelDB-style log, a 7-byte header
    (``:W&B``, magic 0xBEE1, version 0) then 32 KiB blocks of chunks, each with a CRC-32
    (checked here), a length, a type (1 full, 2 first, 3 middle, 4 last) and the payload."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, records, parts = 7, [], []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little left in the block for a chunk header
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        assert crc == zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF, f"bad chunk in {path}"
        pos += 7 + length
        parts.append(payload)
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    return records


def wandb_history(run_dir: Path) -> tuple[dict, dict, dict]:
    """``({(step, tag): value}, summary, config)`` over every offline session of the run."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run in {run_dir / 'wandb'}"
    history, summary, config = {}, {}, {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = items.pop("_step")
                for tag, value in items.items():
                    if not tag.startswith("_"):
                        history[step, tag] = value
            elif kind == "summary":
                for i in record.summary.update:
                    summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
            elif kind in ("config", "run"):  # the run record holds the initial config
                updates = (record.config if kind == "config" else record.run.config).update
                config.update({i.key: json.loads(i.value_json) for i in updates})
                if kind == "run":
                    config["_run"] = record.run
    return history, summary, config


def logged(run_dir: Path) -> dict:
    """``{(step, kind/name): value}``: the numbers of ``metrics.jsonl``, as wandb holds them."""
    out = {}
    for r in read_log(run_dir / "metrics.jsonl"):
        for name, value in r.items():
            if name not in ("step", "kind") and isinstance(value, int | float):
                out[r["step"], f"{r['kind']}/{name}"] = value
    return out


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the `wandb` extra (also in `dev`)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # A dead address: a request to the network would fail (and be logged), not reach anything.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.mark.slow  # two tiny in-process runs, about 15 s
def test_wandb_offline_run_holds_the_log_the_summary_and_the_config(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    cfg = tiny(wandb=True, wandb_group="g", wandb_tags=["smoke", "tiny"], profile_steps=[10, 20])
    results = train(cfg, run_dir)
    history, summary, config = wandb_history(run_dir)
    assert history == logged(run_dir)  # every number of metrics.jsonl, at its meta-step
    assert {s for s, _ in history} == {10, 20}
    assert summary["eval_loss_post"] == results["eval_loss_post"]
    assert (
        json.loads((run_dir / "metrics.json").read_text())["eval_loss_post"]
        == summary["eval_loss_post"]
    )
    assert config["train"]["wandb_tags"] == ["smoke", "tiny"]  # the resolved config
    assert config["inner"]["lr"] == cfg.inner.lr
    run = config["_run"]
    assert (run.project, run.run_group, list(run.tags)) == ("metagrad", "g", ["smoke", "tiny"])
    assert run.display_name == "run"  # the run directory's name
    logs = " ".join(p.read_text() for p in (run_dir / "wandb").rglob("*.log"))
    assert "127.0.0.1:9" not in logs  # never tried the network (it would log the dead address)

    # The profile: one trace, of the chunk of meta-steps 10..19 only.
    traces = list((run_dir / "profile").rglob("*.trace.json.gz"))
    assert len(traces) == 1 and list((run_dir / "profile").rglob("*.xplane.pb"))
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    steps = {e.get("args", {}).get("step_num") for e in events if e.get("name") == "meta_steps"}
    assert steps == {"10"}

    # A resume continues the same wandb run (a second offline session with the same id).
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    train(tiny(steps=30, wandb=True, resume=True), run_dir)
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(p.name.endswith(run_id) for p in sessions)
    history, summary, _ = wandb_history(run_dir)
    assert history == logged(run_dir)
    assert {s for s, _ in history} == {10, 20, 30}


class FakeWandb:
    def __init__(self):
        self.logged, self.summary, self.exit_code = [], {}, None

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_a_resume_sends_wandb_only_what_it_does_not_hold(tmp_path):
    """A run killed after logging step 30 with its checkpoint at 20: the log is cut back to 20;
    the wandb run already holds 30 (a resume recomputes it bit for bit), so 30 is not sent
    again, and 40 is."""
    path = tmp_path / "metrics.jsonl"
    first = FakeWandb()
    log = RunLog(path, wandb=first)
    for step in (10, 20, 30):
        log.write({"step": step, "kind": "train", "meta_loss": 1.0 / step})
    log.write({"step": 30, "kind": "val", "val_loss_post": 0.5, "val_loss_curve": [1.0, 0.5]})
    assert [s for s, _ in first.logged] == [10, 20, 30, 30]
    assert first.logged[-1][1] == {"val/val_loss_post": 0.5}  # lists stay in the JSON log

    again = FakeWandb()
    log = RunLog(path, wandb=again, resume_step=20, wandb_resumed=True)
    assert [r["step"] for r in read_log(path)] == [10, 20]
    for step in (30, 40):
        log.write({"step": step, "kind": "train", "meta_loss": 1.0 / step})
    log.write({"step": 40, "kind": "val", "val_loss_post": float("nan")})
    assert again.logged == [(40, {"train/meta_loss": 1.0 / 40}), (40, {"val/val_loss_post": None})]
    log.summary({"eval_loss_post": 0.25, "_meta_params": object()})
    assert again.summary == {"eval_loss_post": 0.25}
    log.close(failed=True)
    log.close()  # a second close does nothing
    assert again.exit_code == 1

    fresh = FakeWandb()  # wandb turned on at this resume: nothing was sent before
    RunLog(path, wandb=fresh, resume_step=20).write({"step": 30, "kind": "train", "x": 1.0})
    assert [s for s, _ in fresh.logged] == [30]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("profile_steps", [5, 5], r"train.profile_steps=\[5, 5\]: must be \[a, b\]"),
        ("profile_steps", [-1, 3], r"train.profile_steps=\[-1, 3\]: must be \[a, b\]"),
        ("profile_steps", [1, 2, 3], r"train.profile_steps=\[1, 2, 3\]: must be \[a, b\]"),
        ("wandb_project", "", r"train.wandb_project='': must be a name"),
        ("wandb_tags", ["x" * 65], r"train.wandb_tags=.*: must be a list of tags of 1 to 64"),
    ],
)
def test_bad_logger_keys_are_refused_naming_the_key(key, value, message):
    cfg = tiny()
    setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_missing_wandb_is_a_config_error_with_the_pip_command(monkeypatch):
    cfg = tiny(wandb=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"^train.wandb=True: .*pip install 'metagrad\[wandb\]'"):
        validate(cfg)
    cfg.train.wandb = False
    validate(cfg)  # off: the package is not needed
