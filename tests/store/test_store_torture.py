"""Short seeded runs of scripts/torture_store.py (the long run is in the README): 0 wrong rows, 0 lost
sessions, 0 leaked bytes, on the ``file`` and the ``memory`` kvstore."""

import importlib.util
import os


def load():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "torture_store.py")
    spec = importlib.util.spec_from_file_location("torture_store", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_torture_run(tmp_path, capsys):
    rc = load().main(["--seconds", "4", "--seed", "0", "--kill-every", "0", "--reopen-every", "2",
                      "--root", str(tmp_path / "st")])
    out = capsys.readouterr().out
    assert "wrong rows served:   0" in out and "leaked bytes:        0" in out, out
    assert rc == 0, out


def test_short_torture_run_on_the_memory_kvstore(capsys):
    rc = load().main(["--seconds", "3", "--seed", "1", "--kvstore", "memory"])
    out = capsys.readouterr().out
    assert "never reopened and no writer is SIGKILLed" in out, out
    assert "memory kvstore" in out and "reopened 0x, SIGKILLed a writer 0x" in out, out
    assert "wrong rows served:   0" in out and "sessions lost:       0" in out and "leaked bytes:        0" in out, out
    assert rc == 0, out
