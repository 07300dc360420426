"""Exit statuses of the command line: only bad input exits 2; internal and retryable failures exit 1."""

import pytest

from jax_cachedattn import cli
from jax_cachedattn.engine import InputError
from jax_cachedattn.store import DiskFull

ARGS = ["run", "--store", "unused", "--session", "a", "--prompt", "hi"]


@pytest.mark.parametrize("exc,status,text", [
    (InputError("the message is empty"), 2, "error: the message is empty"),
    (DiskFull("no space left"), 1, "cachedattn: error: no space left"),
    (ValueError("a bug deep inside"), 1, "internal error: ValueError: a bug deep inside"),
    (KeyError("k"), 1, "internal error: KeyError"),
])
def test_exit_status(monkeypatch, capsys, exc, status, text):
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_run", boom)
    assert cli.main(ARGS) == status
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if status == 1 and "internal" in text:
        assert cli.main(["--verbose"] + ARGS) == 1
        assert "Traceback" in capsys.readouterr().err


def test_bad_flag_values_are_bad_input(capsys):
    assert cli.main(ARGS + ["--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
