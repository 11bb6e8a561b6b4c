"""The `comm-vlm` command line: cheap to start, documented defaults, one-line user errors; and the lazy package import
that keeps it cheap while `import comm_vlm` still registers the families with transformers' Auto classes."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from comm_vlm.cli import COMMANDS, build_parser, main


TINY_COMM = str(Path(__file__).parent / "recipes" / "tiny_comm.yaml")  # a random tiny COMM, both stages


HEAVY = ("torch", "transformers", "numpy", "PIL")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_dispatched():
    assert set(subcommands()) == set(COMMANDS)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_gives_every_option_a_text_and_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    for action in subcommands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.dest}: no help text"
        if action.required:
            continue
        if action.default is None:  # the help text says what leaving it out means
            assert "default:" in action.help, f"{command} {action.dest}: no default given"
        else:
            assert f"(default: {action.default})" in out, f"{command} {action.dest}"


def test_importing_and_asking_for_help_loads_nothing_heavy():
    code = (
        "import sys\n"
        "from comm_vlm.cli import build_parser\n"
        "parser = build_parser()\n"
        "for command in ('demo', 'layer-study', 'plumbing', 'train', 'assemble', 'convert', 'push', 'evaluate'):\n"
        "    try:\n"
        "        parser.parse_args([command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_a_user_error_is_one_line_and_status_2(tmp_path):
    """The real process: status 2, one line on stderr, no traceback (an error found before anything heavy loads)."""
    argv = ["convert", "--from", "llava-hf", "src", str(tmp_path / "out"), "--matryoshka-scales", "1,x"]
    result = subprocess.run([sys.executable, "-m", "comm_vlm.cli", *argv], capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stdout) == (2, "")
    assert (
        result.stderr == "comm-vlm convert: error: --matryoshka-scales takes integers separated by commas, got '1,x'\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["convert", "--from", "llava-hf", "missing", "out"],
            "comm-vlm convert: error: Source checkpoint missing is not a",
        ),
        (["train", "--recipe", "no_such_recipe"], "comm-vlm train: error: No recipe 'no_such_recipe'"),
        (
            ["train", "--recipe", TINY_COMM, "max_steps"],
            "comm-vlm train: error: Override 'max_steps' is not",
        ),
        (["layer-study", "--stage-steps", "0", "3"], "comm-vlm layer-study: error: --stage-steps must be positive"),
    ],
)
def test_user_errors_in_process(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # each is refused before writing anything, but just in case
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"comm-vlm {argv[0]}: error: ") and message in err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setitem(COMMANDS, "plumbing", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["plumbing"])


def test_package_names_load_on_first_use():
    import comm_vlm

    assert all(getattr(comm_vlm, name) is not None for name in comm_vlm.__all__)
    assert set(comm_vlm.__all__) <= set(dir(comm_vlm))
    with pytest.raises(AttributeError):
        comm_vlm.NoSuchName  # noqa: B018


@pytest.mark.parametrize(
    "first_import",
    [
        "import comm_vlm; import transformers",
        "from comm_vlm.models.configuration_comm import CommConfig",  # a module that itself imports transformers
    ],
)
def test_the_families_are_registered_whatever_is_imported_first(first_import):
    code = (
        f"{first_import}\n"
        "import json\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText\n"
        "import comm_vlm\n"
        "from comm_vlm.families import FAMILIES\n"
        "registered = {}\n"
        "for model_type, family in FAMILIES.items():\n"
        "    config = AutoConfig.for_model(model_type)\n"
        "    registered[model_type] = type(config) is family.config_class and (\n"
        "        AutoModelForImageTextToText._model_mapping[type(config)] is family.model_class)\n"
        "print(json.dumps(registered))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    registered = json.loads(result.stdout.strip().splitlines()[-1])
    assert registered and all(registered.values()), registered
