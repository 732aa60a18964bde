"""Checkpoints from others are data, not code: every checkpoint we read (measure/sweep/export, the healing teacher,
Lightning's resume through `fit`/`validate`/`test`/`heal`) is unpickled with weights_only=True. A pickled payload is
refused with an error naming the file and never runs; every checkpoint we write still loads."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from lightning_speechllm import cli
from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.healing.cli import main as heal
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.checkpoint import (
    SAFE_GLOBALS,
    CheckpointError,
    load_checkpoint_file,
    read_checkpoint,
)
from lightning_speechllm.model.module import SpeechLLMModule
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import SpeechLLMConfig
from tests.test_fit_cli import fit_args
from tests.test_heal_cli import heal_yaml, tiny_assets


class Payload:
    """What an attacker hides in a checkpoint: unpickling it runs code, here writing `marker` (by `exec`, or by a
    shell through `os.system`)."""

    def __init__(self, marker: Path, shell: bool = False) -> None:
        self.marker, self.shell = marker, shell

    def __reduce__(self):
        if self.shell:
            return os.system, (f"touch {shlex.quote(str(self.marker))}",)
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def poisoned(path: Path, marker: Path, base: dict | None = None, shell: bool = False) -> Path:
    """A checkpoint (`base`, else a minimal SpeechLLM one) with a payload among its hyper-parameters."""
    checkpoint = dict(base or {"hyper_parameters": {"model": {}}, "state_dict": {}})
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "note": Payload(marker, shell)}
    torch.save(checkpoint, path)
    return path


def assert_refused(error: pytest.ExceptionInfo, path: Path, offending: str) -> None:
    message = str(error.value)
    assert f"checkpoint {path} was refused" in message and "not plain tensors or containers" in message
    assert f"global {offending!r}" in message and "weights_only=False" not in message  # nothing unsafe suggested


# ------------------------------------------------------------------------------------------- shared tiny runs
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return tiny_assets(tmp_path_factory.mktemp("safety_assets"))


@pytest.fixture(scope="module")
def fit_ckpt(assets, tmp_path_factory) -> Path:
    """A checkpoint of `python -m lightning_speechllm fit` (tiny, 2 steps)."""
    root = tmp_path_factory.mktemp("fit")
    assert cli.fit(fit_args(assets, root, max_steps=2)) == 0
    return next((root / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))


def heal_config(assets: dict[str, Path], root: Path, teacher: Path) -> Path:
    """The tiny `heal` config of tests/test_heal_cli.py, distilling from the `fit` checkpoint `teacher`."""
    config = heal_yaml(assets, root, callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                 "init_args": {"dirpath": str(root / "ck"), "save_last": True}}])
    data = yaml.safe_load(config.read_text())
    data["model"]["model"]["projector"]["hidden_dim"] = 16  # the projector of fit_args, so the teacher's fits
    data["model"]["healing"]["teacher_checkpoint"] = str(teacher)
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.fixture(scope="module")
def heal_run(assets, fit_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """(config, last checkpoint) of `python -m lightning_speechllm heal` with the fit checkpoint as teacher."""
    root = tmp_path_factory.mktemp("heal")
    config = heal_config(assets, root, fit_ckpt)
    assert heal(["--config", str(config)]) == 0
    return config, root / "ck" / "last.ckpt"


# ------------------------------------------------------------------------------------------- refused payloads
def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The check below is real: the old loaders (weights_only=False) ran the payload."""
    for shell in (False, True):
        marker = tmp_path / f"pwned-{shell}"
        torch.load(poisoned(tmp_path / f"bad-{shell}.ckpt", marker, shell=shell), weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize(("shell", "offending"), [(False, "exec"), (True, "posix.system")])
def test_read_checkpoint_and_load_module_refuse_a_payload(tmp_path, shell, offending):
    marker = tmp_path / "pwned"
    bad = poisoned(tmp_path / "bad.ckpt", marker, shell=shell)
    for load in (read_checkpoint, load_module, load_checkpoint_file):
        with pytest.raises(CheckpointError) as error:
            load(bad)
        assert_refused(error, bad, offending)
    assert not marker.exists()


def test_the_teacher_checkpoint_loader_refuses_a_payload(assets, tmp_path):
    marker = tmp_path / "pwned"
    bad = poisoned(tmp_path / "teacher.ckpt", marker)
    model = SpeechLLMConfig(llm_path=str(assets["llm"]), encoder_path=str(assets["whisper"]),
                            projector=ProjectorConfig(downsample=2, hidden_dim=16))
    with pytest.raises(CheckpointError) as error:
        HealingModule(model=model, healing=HealingConfig(removed_layers=[1, 2], teacher_checkpoint=str(bad)))
    assert_refused(error, bad, "exec")
    assert not marker.exists()


def test_resume_through_our_clis_refuses_a_payload(assets, fit_ckpt, heal_run, tmp_path):
    """`fit`/`validate`/`test`/`heal --ckpt_path` refuse it before Lightning opens it, even with a real
    checkpoint around the payload."""
    marker = tmp_path / "pwned"
    bad = poisoned(tmp_path / "bad.ckpt", marker, base=torch.load(fit_ckpt, weights_only=True))
    for command in (cli.fit, cli.validate, cli.test):
        with pytest.raises(CheckpointError) as error:
            command([*fit_args(assets, tmp_path / command.__name__, max_steps=3), "--ckpt_path", str(bad)])
        assert_refused(error, bad, "exec")
    config, _ = heal_run
    with pytest.raises(CheckpointError) as error:
        heal(["--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", str(bad)])
    assert_refused(error, bad, "exec")
    assert not marker.exists()


# ------------------------------------------------------------------------------------- our checkpoints load
def test_fit_and_heal_checkpoints_hold_only_plain_data(fit_ckpt, heal_run):
    """No allow-listed global is needed: keep it so (SAFE_GLOBALS stays empty, see its comment)."""
    assert SAFE_GLOBALS == ()
    for path in (fit_ckpt, heal_run[1]):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path


def test_a_fit_checkpoint_resumes_through_the_cli_and_loads(assets, fit_ckpt, tmp_path):
    assert cli.fit([*fit_args(assets, tmp_path / "run", max_steps=3), "--ckpt_path", str(fit_ckpt)]) == 0
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    assert load_checkpoint_file(next((run / "checkpoints").glob("*.ckpt")))["global_step"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["weights_only"] is True  # explicit, not torch's default
    assert cli.validate([*fit_args(assets, tmp_path / "val", max_steps=3), "--ckpt_path", str(fit_ckpt)]) == 0
    module = load_module(fit_ckpt)
    assert type(module) is SpeechLLMModule and module.speechllm.layer_mask.removed_layers == ()


def test_a_heal_checkpoint_loads_and_resumes(heal_run, fit_ckpt):
    """The heal run read the fit checkpoint as its teacher; its own checkpoint loads and resumes."""
    config, checkpoint = heal_run
    assert load_checkpoint_file(checkpoint)["hyper_parameters"]["healing"]["teacher_checkpoint"] == str(fit_ckpt)
    module = load_module(checkpoint)
    assert isinstance(module, HealingModule) and module.speechllm.layer_mask.removed_layers == (1, 2)
    assert heal(["--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", str(checkpoint)]) == 0
    assert load_checkpoint_file(checkpoint)["global_step"] == 3
