"""The command line: `python -m lightning_speechllm <command>` help, `--print_config` round trips and errors for
bad YAML keys, for every command. Nothing here loads model weights (parsing stops before instantiation)."""
from __future__ import annotations

import importlib

import pytest
import yaml

from lightning_speechllm import __main__ as entry
from tests.test_configs import CONFIGS, cached_cli, parse_lightning

TRAINER_DATA_KEYS = ["--config", "--print_config", "--data.val_sets", "--data.max_duration", "--trainer.max_steps",
                     "--trainer.strategy", "--trainer.devices"]
LIGHTNING_KEYS = [*TRAINER_DATA_KEYS, "--model.model.llm_path", "--model.model.encoder_path", "--model.optim.lr"]
HELP_MENTIONS = {
    "fit": LIGHTNING_KEYS,
    "validate": [*LIGHTNING_KEYS, "--ckpt_path"],
    "test": [*LIGHTNING_KEYS, "--ckpt_path"],
    "predict": [*LIGHTNING_KEYS, "--ckpt_path"],
    # HealingModule takes optional dataclasses: their keys are listed by --model.<name>.help (tested below)
    "heal": [*TRAINER_DATA_KEYS, "--model.model", "--model.healing", "--model.optim", "--model.healing.help"],
    "measure": ["--config", "--print_config", "--ckpt_path", "--token_selection", "--modalities",
                "--model.llm_path", "--model.projector.downsample", "--data.val_sets", "--agreement_selections",
                "--n_perm", "--per_task"],
    "compare": ["maps", "--out", "--labels", "--n_perm", "--n_boot", "--seed"],
    "prune": ["--config", "--print_config", "--method", "--map", "--n", "--fraction", "--llm_path", "--out",
              "--export"],
    "sweep": ["--config", "--print_config", "--ckpt_path", "--sweep.method", "--sweep.fractions",
              "--sweep.max_rel_wer_increase", "--sweep.heal", "--model.llm_path"],
    "export": ["--config", "--print_config", "--ckpt", "--out", "--format"],
    "gguf": ["--config", "--print_config", "--source", "--out", "--types"],
    "gguf-eval": ["--config", "--print_config", "--gguf", "--ckpt", "--types", "--sets", "--limit", "--threads", "--out"],
    "gguf-transcribe": ["--config", "--print_config", "--gguf", "--audio", "--type"],
    "efficiency": ["--config", "--print_config", "--remove", "--plan", "--repeats", "--json_out", "--model.llm_path",
                   "--runtime", "--gguf", "--ckpt", "--types"],
    "assets": ["list", "pull"],
    "data": ["synth", "prepare"],
    "demo": ["--out", "--seed"],
}


def run_command(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `python -m lightning_speechllm <name> argv`, in-process."""
    capsys.readouterr()
    if name not in entry.COMMANDS:
        pytest.fail(f"{name} is not a command of `python -m lightning_speechllm` ({sorted(entry.COMMANDS)})")
    try:
        code = entry.main([name, *argv])
    except SystemExit as stop:  # jsonargparse exits on --help / --print_config / errors
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    captured = capsys.readouterr()
    return int(code or 0), captured.out, captured.err


def test_usage_lists_the_commands(capsys):
    assert entry.main([]) == 0
    usage = capsys.readouterr().out
    for name in entry.COMMANDS:
        assert f"  {name} " in usage
    assert entry.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(HELP_MENTIONS))
def test_help_exits_zero_and_names_the_key_options(name, capsys):
    code, out, err = run_command(name, ["--help"], capsys)
    assert code == 0, err
    missing = [option for option in HELP_MENTIONS[name] if option not in out]
    assert not missing, f"`{name} --help` does not mention {missing}"


@pytest.mark.parametrize("group, mentions", [
    ("--model.healing.help", [f"--model.healing.{key}" for key in
                              ("plan_path", "lora", "losses", "teacher_checkpoint", "on_nan")]),
    ("--model.model.help", [f"--model.model.{key}" for key in
                            ("llm_path", "encoder_path", "projector", "llm_dtype", "train_projector")]),
])
def test_heal_group_help_names_the_nested_keys(group, mentions, capsys):
    code, out, err = run_command("heal", [group], capsys)
    assert code == 0, err
    missing = [option for option in mentions if option not in out]
    assert not missing, f"`heal {group}` does not mention {missing}"


def test_every_dispatched_command_has_help_expectations():
    assert set(entry.COMMANDS) <= set(HELP_MENTIONS), sorted(set(entry.COMMANDS) - set(HELP_MENTIONS))


# ------------------------------------------------------------------------------------------------ --print_config
PRINT_CONFIG_CASES = {
    "fit": CONFIGS / "asr" / "wavlm-large_qwen2.5-7b_librispeech.yaml",
    "heal": CONFIGS / "heal" / "lora.yaml",
    "measure": CONFIGS / "measure" / "librispeech.yaml",
    "prune": CONFIGS / "prune" / "angular.yaml",
}


PARSER_MODULES = {"measure": "lightning_speechllm.redundancy.cli", "prune": "lightning_speechllm.pruning.cli"}


def _nested(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("name", list(PRINT_CONFIG_CASES))
def test_print_config_of_a_shipped_config_round_trips(name, capsys, tmp_path):
    shipped = PRINT_CONFIG_CASES[name]
    code, out, err = run_command(name, ["--config", str(shipped), "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    source = yaml.safe_load(shipped.read_text())
    key = {"fit": "model.model.llm_path", "heal": "model.healing.plan_path", "measure": "model.llm_path",
           "prune": "llm_path"}[name]
    assert _nested(printed, key) == _nested(source, key)
    # the printed config is itself a valid config of the command, with the same values
    (tmp_path / "printed.yaml").write_text(out)
    if name in ("fit", "heal"):
        again = parse_lightning(cached_cli(name), [tmp_path / "printed.yaml"]).as_dict()
        expected = parse_lightning(cached_cli(name), [shipped]).as_dict()
        again.pop("config"), expected.pop("config")  # which files were read
        assert again == expected
    else:
        parse_args = importlib.import_module(PARSER_MODULES[name]).parse_args
        assert parse_args(["--config", str(tmp_path / "printed.yaml")]) == parse_args(["--config", str(shipped)])


def test_print_config_merges_a_trainer_preset(capsys):
    fit = PRINT_CONFIG_CASES["fit"]
    code, out, err = run_command("fit", ["--config", str(fit), "--config", str(CONFIGS / "trainer" / "fsdp.yaml"),
                                         "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["trainer"]["strategy"]["class_path"] == "lightning_speechllm.model.sharding.FSDP2Strategy"
    assert printed["trainer"]["strategy"]["init_args"]["reshard_after_forward"] is True
    assert printed["trainer"]["max_steps"] == yaml.safe_load(fit.read_text())["trainer"]["max_steps"]


# ------------------------------------------------------------------------------------------------ bad YAML keys
BAD_KEYS = {
    "fit": ({"model": {"model": {"llm_paht": "/x"}}}, "llm_paht"),
    "heal": ({"model": {"healing": {"plan_pth": "/x"}}}, "plan_pth"),
    "measure": ({"token_selction": "last"}, "token_selction"),
    "prune": ({"metod": "angular"}, "metod"),
}


@pytest.mark.parametrize("name", list(BAD_KEYS))
def test_unknown_yaml_key_is_an_error_naming_the_key(name, capsys, tmp_path):
    content, key = BAD_KEYS[name]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    code, out, err = run_command(name, ["--config", str(path)], capsys)
    assert code != 0
    assert key in err, f"`{name}` error does not name the bad key {key!r}: {err[-500:]}"


@pytest.mark.parametrize("name, content, key", [
    ("fit", {"trainer": {"max_steps": "many"}}, "max_steps"),
    ("fit", {"trainer": {"strategy": {"class_path": "lightning_speechllm.model.sharding.FSDP2Strategy",
                                      "init_args": {"reshard_after_froward": True}}}}, "reshard_after_froward"),
    ("prune", {"method": "random"}, "method"),
])
def test_bad_value_is_an_error_naming_the_key(name, content, key, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    code, out, err = run_command(name, ["--config", str(path)], capsys)
    assert code != 0
    assert key in err, f"`{name}` error does not name {key!r}: {err[-500:]}"


def test_missing_config_file_is_an_error(capsys, tmp_path):
    code, _, err = run_command("prune", ["--config", str(tmp_path / "absent.yaml")], capsys)
    assert code != 0 and "absent.yaml" in err
