"""Every Python code block of the README runs as written (in order, one namespace, as a reader pastes them) on
the CPU path a user without a GPU gets, and the README's `lipkern train` quick start runs (one epoch)."""

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(_blocks("python")) >= 3


def test_python_blocks_run_as_written_each_on_its_own(monkeypatch, knobs):
    knobs(backend="torch")  # what a CPU user runs (the interpreter is a test device)
    for index, block in enumerate(_blocks("python")):
        namespace: dict = {"__name__": "__readme__"}  # each block runs on its own, as a reader copies it
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message names the block
            pytest.fail(f"README python block {index} fails: {type(err).__name__}: {err}")


def _lipkern_commands(sub: str) -> list[list[str]]:
    lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith(f"lipkern {sub}")]


def test_quick_start_train_command_runs(tmp_path, monkeypatch, knobs):
    from lipkern import cli

    commands = _lipkern_commands("train")
    assert commands, "the README has no `lipkern train` quick start"
    knobs(backend="torch")
    monkeypatch.chdir(tmp_path)
    args = commands[0]
    if "--epochs" in args:
        args[args.index("--epochs") + 1] = "1"
    else:
        args += ["--epochs", "1"]
    import torch

    threads = torch.get_num_threads()  # the command may set --threads: keep the rest of the suite's setting
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
