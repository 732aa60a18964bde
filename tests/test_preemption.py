"""Preemption (lightning_speechllm/preemption.py): real signals to running `fit` processes, the checkpoint they write,
the resumed run against an uninterrupted one, SLURM requeue, `--ckpt_path last`, and the handler bookkeeping.

Which processes get the signal: SLURM signals every task, so the SLURM test starts two processes as srun would
(SLURM_PROCID 0 and 1) and sends SIGUSR1 to both; the other 2-rank test runs Lightning's DDP launcher (rank 0 is the
process the test started, rank 1 its child) and sends SIGTERM to rank 1 only, which the all-reduce of the flags must
turn into a stop of both ranks at the same step. Timing: the test-only callback tests/preemption_pause.py holds every
rank at one optimizer step until the test has signalled them, so the checkpoint step is known without sleeps.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_speechllm import preemption
from lightning_speechllm.preemption import Preempted, PreemptionCheckpoint, requeue_slurm_job, resolve_last_checkpoint
from tests.preemption_pause import SignalAt
from tests.tiny_speechllm import save_tiny_assets

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox", "le chat est sur le tapis",
         "transcribe the audio", "one two three four five", "this is a test"]
SAMPLES = [8000, 6000, 4000, 7000, 5000, 9000, 6500, 5500]  # 0.6 s batches: 4 steps per epoch on each of 2 ranks
MAX_STEPS, STOP_AT = 6, 3  # preempted mid-epoch 0; the resumed run crosses into epoch 1
TOLERANCE = 1e-6  # largest |resumed - uninterrupted| allowed per trainable weight; measured: 0.0 (bit-identical)
TIMEOUT = 300


# ------------------------------------------------------------------------------------------------ subprocess runs
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return save_tiny_assets(tmp_path_factory.mktemp("assets"), TEXTS, SAMPLES)


def run_args(assets: dict, root: Path, ranks: int, *extra: str) -> list[str]:
    """A tiny LoRA run (its dropout makes the RNG state matter) with a high LR (a wrong resume shows)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "fit.yaml").write_text("seed_everything: 0\n")
    args = ["--config", str(root / "fit.yaml"), "--model.model.llm_path", str(assets["llm"]),
            "--model.model.encoder_path", str(assets["whisper"]), "--model.model.projector.hidden_dim", "16",
            "--model.model.projector.downsample", "2",
            "--model.model.lora", "{r: 2, alpha: 4, dropout: 0.3, target_modules: [q_proj, v_proj]}",
            "--model.optim.lr", "0.01", "--model.optim.warmup_steps", "2", "--model.decoding.max_new_tokens", "3",
            "--data.train", str(assets["manifest"]), "--data.val_sets", f"{{dev: {assets['manifest']}}}",
            "--data.max_duration", "0.6", "--trainer.accelerator", "cpu", "--trainer.max_steps", str(MAX_STEPS),
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.precision", "32-true"]  # fp32 everywhere: the runs compared must not differ by the CPU's bf16
    if ranks > 1:
        args += ["--trainer.devices", str(ranks), "--trainer.strategy", "ddp"]
    return ["fit", *args, *extra]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # SLURM only where a test says so
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def fit(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_speechllm", *args], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def pause_args(markers: Path) -> list[str]:
    markers.mkdir(parents=True, exist_ok=True)
    return ["--trainer.callbacks+=tests.preemption_pause.PauseForSignal", "--trainer.callbacks.at_step", str(STOP_AT),
            "--trainer.callbacks.marker_dir", str(markers)]


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lightning_speechllm", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: killed with its DDP child on failure


def signal_at_the_pause(processes: list[subprocess.Popen], markers: Path, ranks: int, signalled: list[int],
                        signum: signal.Signals) -> list[subprocess.CompletedProcess]:
    """Once every rank waits at step STOP_AT (PauseForSignal), send `signum` to the `signalled` ranks, let all go on
    and wait for the processes (and the ranks they launched) to end."""
    try:
        pids = _wait_for_pids(processes, markers, ranks)
        for rank in signalled:
            os.kill(pids[rank], signum)
        (markers / "go.tmp").write_text(json.dumps(signalled))
        os.replace(markers / "go.tmp", markers / "go")
        outputs = [process.communicate(timeout=TIMEOUT) for process in processes]  # EOF: launched ranks gone too
    except BaseException:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        raise
    for pid in pids.values():
        assert _gone(pid), f"process {pid} still runs after fit returned"
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def _wait_for_pids(processes: list[subprocess.Popen], markers: Path, ranks: int) -> dict[int, int]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        files = [markers / f"rank{rank}.pid" for rank in range(ranks)]
        if all(f.exists() for f in files):
            return {rank: int(f.read_text()) for rank, f in enumerate(files)}
        for process in processes:
            if process.poll() is not None:
                out, err = process.communicate()
                raise AssertionError(f"fit ended (exit {process.returncode}) before step {STOP_AT}:\n{out}\n"
                                     f"{err[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"not every rank reached step {STOP_AT} in {TIMEOUT} s")


def _gone(pid: int, wait: float = 10.0) -> bool:
    """Exited (or a zombie waiting for its reaper)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # as Lightning's resume loads it


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def same(a, b) -> bool:
    """Nested equality of checkpoint parts (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run, with a checkpoint after every STOP_AT steps in <root>/steps (step=3, step=6),
    saved at the same hook (on_train_batch_end) as the preemption checkpoint."""
    root = tmp_path_factory.mktemp("reference")
    done = fit(run_args(assets, root, 2, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                        "--trainer.callbacks.dirpath", str(root / "steps"), "--trainer.callbacks.filename", "{step}",
                        "--trainer.callbacks.every_n_train_steps", str(STOP_AT), "--trainer.callbacks.save_top_k",
                        "-1"))
    # Not its exit code: the 2-rank CLI's end-of-fit report is no part of this; the checkpoints are written before.
    assert (root / "steps" / f"step={MAX_STEPS}.ckpt").exists(), done.stderr[-4000:]
    return root / "steps"


def assert_same_state_as_the_uninterrupted_run(saved: dict, reference: Path) -> None:
    """The preemption checkpoint holds what the uninterrupted run had after the same step: weights, AdamW moments,
    LR schedule, loop counters' step and epoch, the Lhotse sampler's position."""
    uninterrupted = load(reference / f"step={STOP_AT}.ckpt")
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers", "SpeechDataModule"):
        assert same(saved[key], uninterrupted[key]), key
    assert saved["global_step"] == STOP_AT and saved["epoch"] == 0  # mid-epoch: 4 steps per epoch and rank


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_resumed_run_equals_an_uninterrupted_one(
        assets, reference, tmp_path):
    """SIGTERM to rank 1 (the child of Lightning's DDP launcher) only: rank 0 stops at the same step through the
    all-reduce of the flags; the checkpoint equals the uninterrupted run's state; `--ckpt_path last` resumes it and
    ends on the uninterrupted run's weights."""
    root = tmp_path / "run"
    [stopped] = signal_at_the_pause([start(run_args(assets, root, 2, *pause_args(tmp_path / "markers")),
                                           environment())], tmp_path / "markers", 2, [1], signal.SIGTERM)
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-4000:]
    checkpoint = root / "preempted.ckpt"
    assert (f"preemption: SIGTERM received on rank 1: checkpoint at step {STOP_AT} written to {checkpoint}"
            in stopped.stdout), stopped.stdout
    assert "not requeued (no requeue signal); exiting" in stopped.stdout
    assert "last validation:" not in stopped.stdout  # no validation, test or report of the unfinished run
    assert not list(root.glob("*.partial")) and not list(root.rglob("hpc_ckpt_*"))
    saved = load(checkpoint)
    assert_same_state_as_the_uninterrupted_run(saved, reference)
    assert len(saved["preemption"]["rng_states"]) == 2  # one per rank, for the LoRA dropout

    resumed = fit(run_args(assets, root, 2, "--ckpt_path", "last"))
    assert f"--ckpt_path last: resuming from {checkpoint}" in resumed.stdout, resumed.stdout + resumed.stderr[-4000:]
    [final] = [load(path) for path in (root / "lightning_logs" / "version_1" / "checkpoints").glob("*.ckpt")]
    uninterrupted = load(reference / f"step={MAX_STEPS}.ckpt")
    assert final["global_step"] == uninterrupted["global_step"] == MAX_STEPS
    assert max_difference(final["state_dict"], uninterrupted["state_dict"]) <= TOLERANCE
    assert max_difference(final["state_dict"], saved["state_dict"]) > 1e-3  # the resumed steps did train


@pytest.mark.parametrize("preset", [None, "multinode.yaml"])
def test_sigusr1_to_every_slurm_task_checkpoints_and_rank_0_requeues_the_job(assets, reference, tmp_path, preset):
    """As under `srun`: two processes with SLURM's variables (Lightning detects SLURMEnvironment, whose default
    auto_requeue would install Lightning's own handler), SLURM's warning signal to every task, a stand-in `scontrol`
    that logs its calls. With the shipped configs/trainer/multinode.yaml (DDP, SLURMEnvironment without Lightning's
    auto-requeue) too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "preemption-test", "SLURM_NTASKS": "2",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "MASTER_PORT": str(_free_port())}
    root, markers = tmp_path / "run", tmp_path / "markers"
    args = run_args(assets, root, 2, *pause_args(markers))
    if preset:
        strategy = args.index("--trainer.strategy")
        del args[strategy:strategy + 2]  # the preset's DDP strategy and SLURMEnvironment plugin instead
        args[3:3] = ["--config", str(REPO / "configs" / "trainer" / preset)]  # before the CPU / 2-task options
        args += ["--trainer.num_nodes", "1"]
    tasks = [start(args, environment(**slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))) for rank in (0, 1)]
    stopped = signal_at_the_pause(tasks, markers, 2, [0, 1], signal.SIGUSR1)
    assert [task.returncode for task in stopped] == [0, 0], [task.stderr[-3000:] for task in stopped]
    out = stopped[0].stdout
    if not preset:  # Lightning's default SLURMEnvironment(auto_requeue=True): the callback turns its handler off
        assert "Lightning's SLURM auto-requeue handler is off" in out, out
    assert (f"preemption: SIGUSR1 received on ranks 0, 1: checkpoint at step {STOP_AT} written to "
            f"{root / 'preempted.ckpt'}" in out), out
    assert "requeued SLURM job 4242; exiting" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # once: from global rank 0 only
    assert not list(root.rglob("hpc_ckpt_*.ckpt"))  # Lightning's handler did not save too
    assert_same_state_as_the_uninterrupted_run(load(root / "preempted.ckpt"), reference)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ in-process
def boring_trainer(root: Path, *callbacks: L.Callback, max_steps: int = 6) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=root, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks))


def test_handlers_are_ours_only_while_training_and_restored_after_a_stop_or_the_end(tmp_path):
    original, original_usr1 = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    callback, recorder = PreemptionCheckpoint(), SignalAt(step=2)
    trainer = boring_trainer(tmp_path, recorder, callback)
    with pytest.raises(Preempted) as stop:
        trainer.fit(BoringModel())
    assert stop.value.code == 0 and recorder.handler_in_training == callback._on_signal
    assert signal.getsignal(signal.SIGTERM) == original and signal.getsignal(signal.SIGUSR1) == original_usr1
    assert torch.load(tmp_path / "preempted.ckpt", weights_only=True)["global_step"] == 2

    callback, recorder = PreemptionCheckpoint(), SignalAt(step=None)
    boring_trainer(tmp_path / "whole", recorder, callback).fit(BoringModel())  # no signal: runs to the end
    assert recorder.handler_in_training == callback._on_signal and signal.getsignal(signal.SIGTERM) == original
    assert not (tmp_path / "whole" / "preempted.ckpt").exists()


def test_a_signal_at_the_last_step_lets_the_run_finish(tmp_path):
    trainer = boring_trainer(tmp_path, SignalAt(step=3), PreemptionCheckpoint(), max_steps=3)
    trainer.fit(BoringModel())
    assert trainer.global_step == 3 and not (tmp_path / "preempted.ckpt").exists()


def test_only_the_first_preemption_callback_acts(tmp_path):
    mine, default = PreemptionCheckpoint(filename="mine.ckpt"), PreemptionCheckpoint()
    with pytest.raises(Preempted):
        boring_trainer(tmp_path, SignalAt(step=2), mine, default).fit(BoringModel())
    assert (tmp_path / "mine.ckpt").exists() and not (tmp_path / "preempted.ckpt").exists()


def test_heal_stops_with_exit_code_0_and_a_checkpoint(assets, tmp_path):
    """`heal` carries the callback too (in-process: main() returns the exit code)."""
    from lightning_speechllm.healing.cli import main

    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "max_steps": 5,
                          "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": str(tmp_path),
                          "callbacks": [{"class_path": "tests.preemption_pause.SignalAt", "init_args": {"step": 2}}]},
              "model": {"model": {"llm_path": str(assets["llm"]), "encoder_path": str(assets["whisper"]),
                                  "projector": {"downsample": 2, "hidden_dim": 16}},
                        "healing": {"removed_layers": [1, 2]}, "decoding": {"generate_in_validation": False}},
              "data": {"train": str(assets["manifest"]), "max_duration": 0.6}}
    (tmp_path / "heal.yaml").write_text(json.dumps(config))
    assert main(["--config", str(tmp_path / "heal.yaml")]) == 0
    saved = torch.load(tmp_path / "preempted.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and saved["healing"]["plan"]["removed_layers"] == [1, 2]


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    (tmp_path / "preempted.ckpt").write_bytes(b"the previous checkpoint")

    def disk_full(self, filepath, weights_only=None, storage_options=None):
        Path(filepath).write_bytes(b"half a checkp")
        raise OSError("No space left on device")

    monkeypatch.setattr(L.Trainer, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left"):
        boring_trainer(tmp_path, SignalAt(step=2), PreemptionCheckpoint()).fit(BoringModel())
    assert (tmp_path / "preempted.ckpt").read_bytes() == b"the previous checkpoint"


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save({"rng": preemption.capture_rng_state()}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    preemption.restore_rng_state(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and (drawn[1] == expected[1]).all() and drawn[2] == expected[2]


# ------------------------------------------------------------------------------------------------ resuming, SLURM
def test_last_is_the_newest_of_the_preemption_and_last_checkpoints_of_any_version(tmp_path):
    trainer = L.Trainer(accelerator="cpu", default_root_dir=tmp_path, callbacks=[PreemptionCheckpoint()])
    assert resolve_last_checkpoint(trainer, "last") is None  # nothing yet: from scratch
    assert resolve_last_checkpoint(trainer, "best") == "best" and resolve_last_checkpoint(trainer, None) is None
    old_last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    old_last.parent.mkdir(parents=True)
    old_last.write_bytes(b"x")
    preempted, newer_last = tmp_path / "preempted.ckpt", tmp_path / "lightning_logs" / "version_1" / "checkpoints"
    preempted.write_bytes(b"x")
    os.utime(old_last, (1000, 1000))
    os.utime(preempted, (2000, 2000))
    assert resolve_last_checkpoint(trainer, "last") == str(preempted)
    newer_last.mkdir(parents=True)
    (newer_last / "last-v1.ckpt").write_bytes(b"x")  # the resumed run finished after the preemption
    assert resolve_last_checkpoint(trainer, "last") == str(newer_last / "last-v1.ckpt")


@pytest.fixture
def scontrol(tmp_path, monkeypatch) -> Path:
    """A stand-in `scontrol` on PATH: logs its arguments, exits with $SCONTROL_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nexit "${SCONTROL_RC:-0}"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(tmp_path / "scontrol.log"))
    return tmp_path / "scontrol.log"


def test_requeue_calls_scontrol_with_the_job_or_array_task(scontrol, monkeypatch):
    assert requeue_slurm_job({"SLURM_JOB_ID": "77"}) == "requeued SLURM job 77"
    assert requeue_slurm_job({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3"}) \
        == "requeued SLURM job 5_3"
    assert scontrol.read_text() == "requeue 77\nrequeue 5_3\n"
    assert requeue_slurm_job({}) == "not requeued (no SLURM_JOB_ID)"
    assert requeue_slurm_job({"SLURM_JOB_ID": "1; rm -rf /"}).startswith("not requeued (unexpected SLURM job id")
    monkeypatch.setenv("SCONTROL_RC", "1")
    assert requeue_slurm_job({"SLURM_JOB_ID": "79"}).startswith("`scontrol requeue 79` failed with exit code 1")
    monkeypatch.setenv("PATH", str(scontrol.parent / "empty"))
    assert requeue_slurm_job({"SLURM_JOB_ID": "80"}).startswith("`scontrol requeue 80` failed: ")


@pytest.mark.parametrize("name", ["fit", "heal"])
def test_a_requeued_sbatch_job_resumes_from_last(name, tmp_path):
    fake_srun = tmp_path / "srun"
    fake_srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake_srun.chmod(0o755)
    env = {**environment(), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
           "PYTHON": "python"}
    for restarts, resume in (("0", []), ("2", ["--ckpt_path", "last"])):
        done = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / f"{name}.sbatch"), "--seed_everything", "1"],
                              env={**env, "SLURM_RESTART_COUNT": restarts}, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        tail = ["--config", "configs/trainer/ddp.yaml", *resume, "--seed_everything", "1"]
        assert done.stdout.splitlines()[-len(tail):] == tail, done.stdout
