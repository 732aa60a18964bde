"""The shipped configs (configs/**) and SLURM scripts: every YAML parses with its command's parser (keys and types
checked, no weights loaded), holds the paper's settings, and the trainer presets merge with the task configs.

LightningCLI-based commands (fit, heal) are parsed through their own entry points with instantiation replaced by a
stop (see :func:`parse_only_cli`), so the parsers carry exactly the entry points' settings.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from lightning_speechllm.config_utils import from_dict
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import SpeechLLMConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SLURM = ROOT / "scripts" / "slurm"

# command -> (module with the entry point and the CLI class, CLI class attribute, entry function)
LIGHTNING_COMMANDS = {
    "fit": ("lightning_speechllm.cli", "SpeechLLMCLI", "fit"),
    "heal": ("lightning_speechllm.healing.cli", "HealingCLI", "main"),
}
# configs/<folder>/ -> the command that reads its files (configs/default.yaml belongs to the integrator)
FOLDER_COMMAND = {"asr": "fit", "ast": "fit", "edge": "fit", "heal": "heal", "measure": "measure", "prune": "prune",
                  "sweep": "sweep", "trainer": "fit"}
FIT_CONFIGS = sorted((CONFIGS / "asr").glob("*.yaml")) + sorted((CONFIGS / "ast").glob("*.yaml"))
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
PLACEHOLDER = "/path/to/"


# ------------------------------------------------------------------------------------------------ parse-only CLIs
class ParsedConfig(Exception):
    """Raised by a parse-only CLI right after parsing; carries the CLI (its `parser` and `config`)."""

    def __init__(self, cli: LightningCLI) -> None:
        super().__init__("parsed")
        self.cli = cli


def parse_only_cli(command: str, argv: list[str]) -> LightningCLI:
    """Run the `command` entry point on `argv` with instantiation replaced by a stop; return the parsed CLI."""
    module_name, class_name, function_name = LIGHTNING_COMMANDS[command]
    module = importlib.import_module(module_name)
    base: type[LightningCLI] = getattr(module, class_name)

    class ParseOnly(base):  # type: ignore[misc, valid-type]
        def before_instantiate_classes(self) -> None:
            raise ParsedConfig(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, class_name, ParseOnly)
        try:
            getattr(module, function_name)(argv)
        except ParsedConfig as parsed:
            return parsed.cli
    raise AssertionError(f"{command} {argv} returned without reaching instantiation")


def parse_lightning(cli: LightningCLI, configs: list[Path | str], extra: list[str] | None = None) -> Namespace:
    """Parse `--config` files (later ones override earlier ones) with `cli`'s parser; return the fit section.

    Results are cached per (parser, files, extra): tests read them and must not modify them.
    """
    return _parse_cached(cli, tuple(str(path) for path in configs), tuple(extra or ()))


@functools.lru_cache(maxsize=None)
def _parse_cached(cli: LightningCLI, configs: tuple[str, ...], extra: tuple[str, ...]) -> Namespace:
    argv = ["fit"]
    for path in configs:
        argv += ["--config", path]
    return cli.parser.parse_args(argv + list(extra)).fit


@functools.lru_cache(maxsize=None)
def cached_cli(command: str) -> LightningCLI:
    """One parse-only CLI per command (building a LightningCLI parser takes seconds); tests parse their own
    `--config` files with its parser."""
    return parse_only_cli(command, ["--seed_everything", "0"])


@pytest.fixture
def fit_cli() -> LightningCLI:
    return cached_cli("fit")


@pytest.fixture
def heal_cli() -> LightningCLI:
    return cached_cli("heal")


def _dict(value) -> dict:
    return value.as_dict() if isinstance(value, Namespace) else dict(value)


def _model_config(cfg: Namespace) -> SpeechLLMConfig:
    return from_dict(SpeechLLMConfig, _dict(cfg.model.model))


# ------------------------------------------------------------------------------------------------ inventory
def test_every_shipped_yaml_belongs_to_a_command():
    shipped = [p for p in CONFIGS.rglob("*.yaml") if p != CONFIGS / "default.yaml"]
    orphans = [str(p.relative_to(ROOT)) for p in shipped if p.parent.name not in FOLDER_COMMAND]
    assert not orphans, f"configs with no known command (add their folder to FOLDER_COMMAND): {orphans}"
    for folder in FOLDER_COMMAND:
        assert list((CONFIGS / folder).glob("*.yaml")), f"configs/{folder}/ holds no YAML"
    for path in shipped:
        assert isinstance(yaml.safe_load(path.read_text()), dict), f"{path}: not a YAML mapping"


def _header(text: str) -> str:
    """The comment lines at the top of a file."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_cluster_configs_name_placeholder_model_dirs_with_an_edit_note():
    for path in [*FIT_CONFIGS, CONFIGS / "heal" / "lora.yaml", *(CONFIGS / "measure").glob("*.yaml"),
                 *(CONFIGS / "prune").glob("*.yaml")]:
        text = path.read_text()
        header = _header(text)
        assert "EDIT" in header, f"{path}: the header comment does not say what to EDIT"
        assert PLACEHOLDER in text, f"{path}: no {PLACEHOLDER}... placeholder for the local model directories"
        for key in re.findall(r"^\s*(\w+): /path/to/", text, flags=re.M):
            assert key in header, f"{path}: placeholder key {key!r} is not named in the header"
    for path in [*TRAINER_PRESETS, CONFIGS / "heal" / "kd.yaml"]:
        assert "python -m lightning_speechllm" in _header(path.read_text()), f"{path}: no usage line in the header"


# ------------------------------------------------------------------------------------------------ no test data before the end
NAMES_A_TEST_SET = re.compile(r"(?<![a-z])test", re.IGNORECASE)  # test-clean, cuts_test, ast_test.jsonl; not "latest"


def _select_keys(path: Path) -> list[tuple[str, str]]:
    """(key, value) of everything a shipped config reads BEFORE its final report, parsed with its command's parser:
    validation sets (name and manifest), checkpoint / early-stopping monitors, the sets the redundancy callback or
    `measure` maps, the map `prune` and `sweep` cut along, and the sets and stage of the sweep's rule. Test sets
    (`data.test_sets`, `sweep.test_sets`) are read only afterwards and are not listed."""
    command = "fit" if path == CONFIGS / "default.yaml" else FOLDER_COMMAND[path.parent.name]
    keys: list[tuple[str, str]] = []

    def add_sets(prefix: str, sets) -> None:
        for name, manifest in _dict(sets or {}).items():
            keys.extend([(prefix, str(name)), (f"{prefix}.{name}", str(manifest))])

    if command in LIGHTNING_COMMANDS:
        base = {"kd.yaml": "lora.yaml", "linear_patch.yaml": "default.yaml"}.get(path.name)  # overlays
        configs = [CONFIGS / "heal" / base, path] if base and path.parent.name == "heal" else [path]
        cfg = parse_lightning(cached_cli(command), configs)
        add_sets("data.val_sets", cfg.data.val_sets)
        for callback in cfg.trainer.callbacks or []:
            args = callback.init_args or Namespace()
            if args.get("monitor"):
                keys.append((f"{callback.class_path}.monitor", args.monitor))
            keys.extend((f"{callback.class_path}.sets", name) for name in args.get("sets") or [])
    elif command == "measure":
        from lightning_speechllm.redundancy.cli import parse_args

        args, _, data = parse_args(["--config", str(path)])
        add_sets("data.val_sets", data.get("val_sets"))
        keys.extend(("sets", name) for name in args.sets or [])
    elif command == "prune":
        from lightning_speechllm.pruning.cli import parse_args

        keys.append(("map", str(parse_args(["--config", str(path)]).map)))
    elif command == "sweep":
        from lightning_speechllm.evaluation.sweep.cli import parse_args

        parsed = parse_args(["--config", str(path)])
        sweep = parsed["sweep"]
        keys.append(("sweep.stage", sweep.stage))  # "test": the rule would choose on the test sets
        add_sets("data.val_sets" if sweep.stage == "validate" else "data.test_sets",
                 parsed["data"].get("val_sets" if sweep.stage == "validate" else "test_sets"))
        keys.extend(("sweep.sets", name) for name in sweep.sets or [])
        if sweep.map_path:
            keys.append(("sweep.map_path", sweep.map_path))
    return keys


SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_never_read_a_test_set_before_the_final_report(path):
    """Validation, checkpoint selection, redundancy maps, pruning maps and the sweep's rule read dev sets only
    (dev-clean/dev-other, CoVoST 2 dev, the synthetic dev split); test sets are scored once, at the end."""
    keys = _select_keys(path)
    offending = [(key, value) for key, value in keys if NAMES_A_TEST_SET.search(value)]
    assert not offending, f"{path.relative_to(ROOT)} reads test data before the final report: {offending}"
    if path.parent.name not in ("trainer", "edge") and path.name != "kd.yaml":  # presets and overlays: no data
        assert keys, f"{path.relative_to(ROOT)}: found nothing to check (did its parser change?)"


def test_the_test_set_check_catches_test_names_and_manifests():
    for value in ("test-clean", "cuts_test-other.jsonl.gz", "data_cache/synth/test.jsonl", "ast_test", "val/test/wer",
                  "/m/test-clean/speech/epoch=0.json", "TEST"):
        assert NAMES_A_TEST_SET.search(value), value
    for value in ("dev-clean", "cuts_ast_dev.jsonl.gz", "val/dev-clean/wer", "/path/to/latest/map.json", "heldout"):
        assert not NAMES_A_TEST_SET.search(value), value


# ------------------------------------------------------------------------------------------------ fit configs
@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.stem)
def test_fit_config_parses_with_the_paper_setup(fit_cli, path):
    cfg = parse_lightning(fit_cli, [path])
    model = _model_config(cfg)
    assert model.llm_path.startswith(PLACEHOLDER) and model.encoder_path.startswith(PLACEHOLDER)
    assert (model.projector.kind, model.projector.downsample, model.projector.hidden_dim) == ("mlp", 5, 2048)
    assert model.lora is None and not model.train_encoder and model.train_projector  # frozen encoder + decoder
    # the decoder is stored in bf16; the precision is left to the hardware (bf16-mixed where it is native)
    assert model.llm_dtype == "bfloat16" and cfg.trainer.precision is None
    assert 50_000 <= cfg.trainer.max_steps <= 75_000
    optim = from_dict(OptimConfig, _dict(cfg.model.optim))
    assert optim.schedule in ("linear", "cosine") and 0 < optim.lr < 1e-2
    assert from_dict(DecodingConfig, _dict(cfg.model.decoding)).num_beams == 1  # greedy decoding
    data = SpeechDataModule(**_dict(cfg.data))  # constructor checks (no manifest is read)
    assert data.train_paths and data.max_duration > 0
    expected = {"asr": {"dev-clean", "dev-other"}, "ast": {"fr-en", "en-de"}}[path.parent.name]
    assert set(data.val_set_names) == expected
    # the checkpoint chosen on dev is scored once on test, after training
    assert set(data.test_set_names) == {"asr": {"test-clean", "test-other"}, "ast": {"fr-en", "en-de"}}[
        path.parent.name] and cfg.test_after_fit is True
    encoder = {"asr": "wavlm", "ast": "whisper"}[path.parent.name]
    assert encoder in model.encoder_path.lower()
    monitored = [c.init_args.monitor for c in cfg.trainer.callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert monitored and all(m.split("/")[1] in expected for m in monitored), monitored


def test_config_values_reach_the_parsed_namespace(fit_cli):
    """An override after the config wins, the rest of the config stays (the merge the presets rely on)."""
    path = CONFIGS / "asr" / "wavlm-large_qwen2.5-7b_librispeech.yaml"
    cfg = parse_lightning(fit_cli, [path], ["--trainer.max_steps", "60000"])
    assert cfg.trainer.max_steps == 60000
    assert cfg.model.model.llm_path == yaml.safe_load(path.read_text())["model"]["model"]["llm_path"]


def test_the_saved_config_writes_the_train_list_as_a_yaml_list(fit_cli, tmp_path):
    """The config.yaml a run saves lists the train manifests (it once held the list's repr as one string)."""
    default = CONFIGS / "default.yaml"
    saved = yaml.safe_load(fit_cli.parser.dump(fit_cli.parser.parse_args(["fit", "--config", str(default)]),
                                               skip_check=True))
    assert saved["fit"]["data"]["train"] == yaml.safe_load(default.read_text())["data"]["train"]
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(saved["fit"]))
    again = parse_lightning(fit_cli, [tmp_path / "saved.yaml"])
    assert again.data.train == saved["fit"]["data"]["train"]


# ------------------------------------------------------------------------------------------------ trainer presets
def _strategy_class(cfg: Namespace) -> str:
    strategy = cfg.trainer.strategy
    return strategy if isinstance(strategy, str) else strategy.class_path


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.stem)
def test_trainer_preset_merges_with_every_fit_config(fit_cli, preset):
    raw = yaml.safe_load(preset.read_text())
    assert set(raw) == {"trainer"}, f"{preset}: a trainer preset holds only the trainer section"
    assert "callbacks" not in raw["trainer"] and "logger" not in raw["trainer"], \
        f"{preset}: lists like callbacks are replaced on merge; leave them to the task configs"
    for path in FIT_CONFIGS:
        task = parse_lightning(fit_cli, [path])
        merged = parse_lightning(fit_cli, [path, preset])
        assert merged.trainer.devices == raw["trainer"]["devices"]
        assert merged.trainer.num_nodes == raw["trainer"]["num_nodes"]
        assert merged.trainer.precision == raw["trainer"]["precision"]
        assert _strategy_class(merged) == raw["trainer"]["strategy"]["class_path"]
        # everything the preset does not set comes from the task config
        assert merged.trainer.max_steps == task.trainer.max_steps
        assert merged.trainer.callbacks == task.trainer.callbacks
        assert merged.model == task.model and merged.data == task.data


def _instantiate_strategy(cfg: Namespace):
    strategy = cfg.trainer.strategy
    module_name, class_name = strategy.class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**_dict(strategy.init_args), **dict(strategy.get("dict_kwargs") or {}))


def test_fsdp_preset_builds_our_fsdp2_strategy(fit_cli):
    from lightning_speechllm.model.sharding import FSDP2Strategy

    strategy = _instantiate_strategy(parse_lightning(fit_cli, [CONFIGS / "trainer" / "fsdp.yaml"]))
    assert type(strategy) is FSDP2Strategy and strategy.reshard_after_forward is True
    assert strategy._save_distributed_checkpoint is False  # one file, trainable weights only
    assert "same sharded SpeechLLM" in (CONFIGS / "trainer" / "fsdp.yaml").read_text()


def test_every_trainer_preset_is_tested_end_to_end():
    """No untested preset ships: each one runs on 2 gloo ranks in tests/test_sharded.py or tests/test_preemption.py."""
    presets = {p.name for p in (CONFIGS / "trainer").glob("*.yaml")}
    assert presets == {"ddp.yaml", "fsdp.yaml", "multinode.yaml"}
    tested = (ROOT / "tests" / "test_sharded.py").read_text() + (ROOT / "tests" / "test_preemption.py").read_text()
    assert all(name in tested for name in presets), presets


def test_ddp_presets_build_their_strategy(fit_cli):
    for name in ("ddp.yaml", "multinode.yaml"):
        strategy = _instantiate_strategy(parse_lightning(fit_cli, [CONFIGS / "trainer" / name]))
        assert type(strategy).__name__ == "DDPStrategy"
        assert strategy._ddp_kwargs["find_unused_parameters"] is False


def test_multinode_preset_uses_the_slurm_environment(fit_cli):
    cfg = parse_lightning(fit_cli, [CONFIGS / "trainer" / "multinode.yaml"])
    assert cfg.trainer.num_nodes > 1
    plugins = [p.class_path for p in cfg.trainer.plugins]
    assert plugins == ["lightning.pytorch.plugins.environments.SLURMEnvironment"]
    assert cfg.trainer.plugins[0].init_args.requeue_signal.name == "SIGUSR1"


# ------------------------------------------------------------------------------------------------ heal
def test_heal_lora_config_is_the_paper_healing(heal_cli):
    from lightning_speechllm.healing.losses import build_losses
    from lightning_speechllm.healing.module import HealingConfig

    cfg = parse_lightning(heal_cli, [CONFIGS / "heal" / "lora.yaml"])
    healing = from_dict(HealingConfig, _dict(cfg.model.healing))
    assert healing.plan_path and healing.plan_path.startswith(PLACEHOLDER)
    lora = healing.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.layers) == (64, 64, 0.05, None)  # None: the receiving layer
    assert _model_config(cfg).train_projector and _model_config(cfg).lora is None
    optim = from_dict(OptimConfig, _dict(cfg.model.optim))
    assert (optim.lr, optim.schedule, optim.weight_decay, optim.min_lr_ratio) == (5e-4, "linear", 0.0, 0.0)
    assert cfg.trainer.max_steps == 5000
    assert list(build_losses(healing.losses).parts) == ["task_cross_entropy"]


def test_heal_kd_overlay_adds_distillation_losses(heal_cli):
    from lightning_speechllm.healing.losses import KLDivergence, build_losses

    lora = parse_lightning(heal_cli, [CONFIGS / "heal" / "lora.yaml"])
    cfg = parse_lightning(heal_cli, [CONFIGS / "heal" / "lora.yaml", CONFIGS / "heal" / "kd.yaml"])
    loss = build_losses(_dict(cfg.model)["healing"]["losses"])
    assert sorted(type(part).__name__ for part in loss.parts.values()) == [
        "HiddenStateMSE", "KLDivergence", "TaskCrossEntropy"]
    kl = next(part for part in loss.parts.values() if isinstance(part, KLDivergence))
    assert (kl.direction, kl.temperature) == ("forward", 2.0)
    assert all(weight > 0 for weight in loss.weights.values())
    assert any(part.needs_hidden_states for part in loss.parts.values())
    assert cfg.model.healing.teacher_checkpoint  # the fit run's projector feeds the teacher
    # the overlay changes only the losses and where the run writes
    assert cfg.model.healing.lora == lora.model.healing.lora and cfg.model.optim == lora.model.optim
    assert cfg.trainer.default_root_dir != lora.trainer.default_root_dir


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.stem)
def test_trainer_preset_merges_with_heal(heal_cli, preset):
    heal = [CONFIGS / "heal" / "lora.yaml", CONFIGS / "heal" / "kd.yaml"]
    cfg = parse_lightning(heal_cli, [*heal, preset])
    assert _strategy_class(cfg) == yaml.safe_load(preset.read_text())["trainer"]["strategy"]["class_path"]
    assert cfg.trainer.max_steps == 5000 and len(cfg.model.healing.losses) == 3


# ------------------------------------------------------------------------------------------------ measure, prune
def test_measure_config_parses():
    from lightning_speechllm.redundancy.cli import parse_args

    args, model, data = parse_args(["--config", str(CONFIGS / "measure" / "librispeech.yaml")])
    assert args.token_selection == "last" and set(args.modalities) == {"speech", "text"}
    assert args.ckpt_path.startswith(PLACEHOLDER) and model.llm_path.startswith(PLACEHOLDER)
    assert (model.projector.downsample, model.projector.hidden_dim) == (5, 2048)
    assert set(SpeechDataModule(**data).val_set_names) == {"dev-clean", "dev-other"}
    fit = yaml.safe_load((CONFIGS / "asr" / "wavlm-large_qwen2.5-7b_librispeech.yaml").read_text())
    trained = fit["model"]["model"]["projector"]
    assert {k: v for k, v in asdict(model.projector).items() if k in trained} == trained  # the model fit trained
    assert asdict(model.projector) == asdict(ProjectorConfig(**trained))  # and no training-only option set


def test_prune_config_parses_and_points_at_a_measured_map():
    from lightning_speechllm.pruning.cli import parse_args

    args = parse_args(["--config", str(CONFIGS / "prune" / "angular.yaml")])
    assert args.method == "angular" and args.map.endswith(".json")
    assert (args.n is None) != (args.fraction is None)
    assert args.llm_path.startswith(PLACEHOLDER) and args.out and args.export


def test_default_sweep_config_parses_and_scores_what_the_default_fit_validates():
    from lightning_speechllm.evaluation.sweep.cli import parse_args

    parsed = parse_args(["--config", str(CONFIGS / "sweep" / "default.yaml")])
    sweep, fit = parsed["sweep"], yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert sweep.method == "angular" and sweep.heal and sweep.sets == ["dev"] and sweep.stage == "validate"
    assert (sweep.max_rel_wer_increase, sweep.max_rel_bleu_drop) == (0.25, 0.10)  # the paper's rule
    for key in ("train", "val_sets", "test_sets", "max_audio_seconds"):
        assert parsed["data"][key] == fit["data"][key], key
    assert sweep.test_sets == list(fit["data"]["test_sets"])  # the chosen point is reported on test afterwards
    assert parsed["decoding"].max_new_tokens == fit["model"]["decoding"]["max_new_tokens"]
    # the same evaluation batches as fit's (eval_max_duration defaults to max_duration, 12 s here for healing)
    fit_eval_seconds = fit["data"].get("eval_max_duration") or fit["data"]["max_duration"]
    assert (parsed["data"]["eval_max_duration"] or parsed["data"]["max_duration"]) == fit_eval_seconds


def test_default_heal_config_matches_the_default_fit_model_and_parses():
    heal, fit = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("heal/default.yaml", "default.yaml"))
    assert heal["model"]["model"] == fit["model"]["model"]  # the fit checkpoint's projector must fit the student
    for key in ("train", "val_sets", "max_audio_seconds", "encoder_cache"):
        assert heal["data"][key] == fit["data"][key], key
    assert [loss["class_path"] for loss in heal["model"]["healing"]["losses"]] == ["TaskCrossEntropy", "KLDivergence"]
    cli = parse_only_cli("heal", ["--config", str(CONFIGS / "heal/default.yaml"), "--model.healing.removed_layers",
                                  "[5, 6, 7]"])
    parsed = cli.config.fit
    assert parsed.model.healing.removed_layers == [5, 6, 7] and parsed.trainer.max_steps == 200


# ------------------------------------------------------------------------------------------------ SLURM scripts
def _sbatch(path: Path) -> tuple[dict[str, str], dict[str, str], str]:
    """(#SBATCH options, default shell variables VAR=${VAR:-value}, text) of an sbatch script."""
    text = path.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}", text, flags=re.M))
    return options, defaults, text


@pytest.mark.parametrize("name", ["fit", "heal", "measure"])
def test_sbatch_shape_matches_its_trainer_preset(name):
    path = SLURM / f"{name}.sbatch"
    options, defaults, text = _sbatch(path)
    body = text[text.index("set -euo pipefail"):]
    assert not re.search(r"^#SBATCH", body, flags=re.M), f"{path}: #SBATCH after the first command is ignored"
    assert re.search(rf"^srun .* -m lightning_speechllm {name} ", text, flags=re.M), f"{path}: no srun {name}"
    config = ROOT / defaults["CONFIG"]
    assert config.is_file(), f"{path}: CONFIG default {config} does not exist"
    nodes, tasks, gpus = (int(options[key]) for key in ("nodes", "ntasks-per-node", "gpus-per-node"))
    assert tasks == gpus, f"{path}: Lightning's SLURMEnvironment needs one task per GPU"
    if name == "measure":
        assert (nodes, tasks) == (1, 1), f"{path}: measure runs on one device"
        return
    preset = yaml.safe_load((ROOT / defaults["TRAINER"]).read_text())["trainer"]
    assert (nodes, tasks) == (preset["num_nodes"], preset["devices"]), \
        f"{path}: #SBATCH nodes x tasks {nodes}x{tasks} != {defaults['TRAINER']} {preset['num_nodes']}x{preset['devices']}"
    assert "SIGUSR1" in options.get("signal", ""), f"{path}: no requeue signal"


@pytest.mark.parametrize("name", ["fit", "heal"])
def test_preset_examples_in_sbatch_comments_match_their_presets(name):
    """Lines like `TRAINER=configs/trainer/X.yaml sbatch [--nodes=N ...] script` run X with the shape they give."""
    options, _, text = _sbatch(SLURM / f"{name}.sbatch")
    examples = [line for line in text.splitlines() if line.startswith("#") and "TRAINER=configs/trainer/" in line]
    assert examples, f"{name}.sbatch shows no example with another trainer preset"
    for line in examples:
        preset_path = re.search(r"TRAINER=(configs/trainer/[\w.]+\.yaml)", line).group(1)
        preset = yaml.safe_load((ROOT / preset_path).read_text())["trainer"]
        shape = {**options, **dict(re.findall(r"--([\w-]+)=(\d+)", line))}
        assert int(shape["nodes"]) == preset["num_nodes"], line
        assert int(shape["ntasks-per-node"]) == int(shape["gpus-per-node"]) == preset["devices"], line


@pytest.mark.parametrize("name, env, expected", [
    ("fit", {}, ["fit", "--config", "configs/asr/wavlm-large_qwen2.5-7b_librispeech.yaml",
                 "--config", "configs/trainer/ddp.yaml"]),
    ("heal", {"KD": "configs/heal/kd.yaml", "TRAINER": "configs/trainer/fsdp.yaml"},
     ["heal", "--config", "configs/heal/lora.yaml", "--config", "configs/heal/kd.yaml",
      "--config", "configs/trainer/fsdp.yaml"]),
    ("heal", {}, ["heal", "--config", "configs/heal/lora.yaml", "--config", "configs/trainer/ddp.yaml"]),
    ("measure", {}, ["measure", "--config", "configs/measure/librispeech.yaml"]),
])
def test_sbatch_script_runs_the_command_through_srun(name, env, expected, tmp_path):
    """Run the script with a stand-in `srun` that prints its arguments: the configs and extra options arrive."""
    fake_srun = tmp_path / "srun"
    fake_srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake_srun.chmod(0o755)
    environ = {**os.environ, **env, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
               "PYTHON": "python"}
    done = subprocess.run(["bash", str(SLURM / f"{name}.sbatch"), "--seed_everything", "1"], env=environ,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["python", "-m", "lightning_speechllm", *expected, "--seed_everything", "1"]


def test_the_voxtral_overlay_gives_a_model_with_a_voxtral_form(fit_cli):
    """configs/edge/voxtral.yaml on the default: the shape `export --format voxtral` needs (checked against the
    export's own rules on the real Whisper tiny.en and SmolLM2 shapes, without loading weights)."""
    cfg = parse_lightning(fit_cli, [CONFIGS / "default.yaml", CONFIGS / "edge" / "voxtral.yaml"])
    model = _model_config(cfg)
    assert model.encoder_whole_window and model.encoder_window_step_seconds is None
    assert (model.projector.kind, model.projector.downsample, model.projector.hidden_dim, model.projector.bias) == (
        "mlp", 4, 576, False)  # Whisper tiny.en: 1536 // 384 = 4 frames; SmolLM2-135M: 576 wide
    assert model.llm_path == "smollm2-135m" and model.encoder_path == "whisper-tiny.en"
