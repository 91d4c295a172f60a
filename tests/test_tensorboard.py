"""``train.tensorboard=true``: event files whose scalars are the JSON lines log's numbers, and a
clear error before anything compiles when tensorboardX is missing."""

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from test_train_cli import TINY, cli

from metagrad.experiment.config import Config, ConfigError, validate


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from the TFRecord event files in ``folder``, checksums checked.

    A record is: length (u64), its masked CRC32C (u32), the serialized ``Event``, its CRC (u32).
    """
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    out: dict[str, dict[int, float]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
            payload = data[pos + 12 : pos + 12 + length]
            crc = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0]
            assert crc == masked_crc32c(payload), f"corrupt record in {path}"
            pos += 16 + length
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


@pytest.mark.slow
def test_event_files_hold_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboardX")  # the `tensorboard` extra (also in `dev`)
    run_dir = tmp_path / "run"
    cli("train.py", *TINY, "train.tensorboard=true", f"hydra.run.dir={run_dir}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(run_dir / "tensorboard")
    for kind, name in (("train", "meta_loss"), ("train", "loss_pre"), ("val", "val_loss_post")):
        logged = {r["step"]: r[name] for r in records if r["kind"] == kind}
        assert len(logged) == 3, (kind, name, logged)  # steps 100, 200, 300
        events = scalars[f"{kind}/{name}"]
        assert sorted(events) == sorted(logged)
        for step, value in logged.items():  # event files store float32
            assert events[step] == np.float32(value), (kind, name, step)
    assert not any(tag.endswith("_curve") for tag in scalars)  # lists stay in the JSON log


def test_missing_tensorboardx_is_a_config_error(monkeypatch):
    cfg = Config()
    cfg.train.tensorboard = True
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name)
    )
    with pytest.raises(ConfigError, match=r"train.tensorboard=True: needs the tensorboardX"):
        validate(cfg)
    cfg.train.tensorboard = False
    validate(cfg)  # off: the package is not needed
