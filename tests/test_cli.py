"""Tests for wecolora.cli: argument parsing, help texts and their examples, the one-line error format and
exit statuses (2 for the user's mistakes, 130 for an interrupt), and the small commands end to end."""
import argparse
import errno
import json
import shlex

import pytest

import wecolora
from wecolora import cli
from wecolora.cli import build_parser, main, one_line
from wecolora.errors import UserError

COMMANDS = ("distill", "inspect", "views", "plan", "pretrain", "probe", "knn", "report", "ablate", "demo", "bench", "export", "cache")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub for action in actions for name, sub in action.choices.items()}


def _every_command() -> list[tuple[list[str], argparse.ArgumentParser]]:
    found = []
    for name, sub in _subparsers(build_parser()).items():
        found.append(([name], sub))
        found += [([name, inner], parser) for inner, parser in _subparsers(sub).items()]
    return found


EVERY_COMMAND = _every_command()


def test_the_commands():
    assert tuple(_subparsers(build_parser())) == COMMANDS
    assert set(_subparsers(_subparsers(build_parser())["cache"])) == {"list", "clear"}


@pytest.mark.parametrize("words, parser", EVERY_COMMAND, ids=[" ".join(w) for w, _ in EVERY_COMMAND])
def test_every_help_exits_0_and_shows_its_examples(capsys, words, parser):
    with pytest.raises(SystemExit) as exit:
        main([*words, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: wecolora {' '.join(words)}")
    if parser.epilog:
        assert "examples:" in out


@pytest.mark.parametrize("command", ["distill", "inspect", "pretrain", "probe", "ablate", "bench", "export", "cache"])
def test_the_main_commands_have_examples(command):
    assert "examples:" in (_subparsers(build_parser())[command].epilog or "")


def _example_lines(epilog: str) -> list[str]:
    text = epilog.replace("\\\n", " ")  # a shell continuation
    return [line.strip() for line in text.splitlines() if line.strip().startswith("wecolora ")]


EXAMPLES = sorted({line for _, parser in EVERY_COMMAND for line in _example_lines(parser.epilog or "")})


def test_the_examples_are_found():
    assert len(EXAMPLES) > 20


@pytest.mark.parametrize("line", EXAMPLES)
def test_every_example_in_the_help_parses(line):
    args = build_parser().parse_args(shlex.split(line, comments=True)[1:])
    assert callable(args.handler)
    if getattr(args, "preset", None):
        from wecolora.grid.ablate import presets

        assert args.preset in presets()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"wecolora {wecolora.__version__}"


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: COMMAND"),
    (["train"], "invalid choice: 'train'"),
    (["distill", "--mode", "lora"], "argument --mode: invalid choice: 'lora'"),
    (["distill", "--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["inspect"], "the following arguments are required: --teacher"),
    (["cache"], "the following arguments are required: ACTION"),
    (["export", "runs/x"], "the following arguments are required: --onnx"),
])
def test_a_bad_command_line_is_one_line_and_status_2(capsys, argv, words):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert words in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("wecolora") and "error:" in last and "--help`)" in last


def test_distill_on_missing_data_is_one_line_and_status_2(capsys, tmp_path):
    output = tmp_path / "run"
    assert main(["distill", "--teacher", "bundled", "--data", "/nonexistent", "--output", str(output)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wecolora: error:")
    assert "/nonexistent" in lines[0]
    assert captured.out == ""
    assert not output.exists()


@pytest.mark.parametrize("argv, words", [
    (["distill", "--data", "fashion-mnist", "--output", "{tmp}/r"], "missing required setting(s): --teacher"),
    (["distill", "--teacher", "bundled", "--data", "fashion-mnist", "--output", "{tmp}/r", "--ratio", "2"],
     "--ratio 2.0 is invalid"),
    (["distill", "--teacher", "./no/such", "--data", "fashion-mnist", "--output", "{tmp}/r"], "no such folder"),
    (["distill", "--teacher", "bundled", "--data", "fashion-mnist", "--output", "{tmp}/r", "--keep", "middle"],
     "--keep 'middle' is invalid"),
    (["distill", "--config", "{tmp}/none.yaml"], "config file"),
    (["probe", "--model", "bundled", "--data", "{tmp}/none", "--output", "{tmp}/p"], "neither an existing folder"),
    (["knn", "--model", "bundled", "--data", "mnist-5k", "--output", "{tmp}/k", "--k", "0"], "--k 0 is invalid"),
    (["report", "{tmp}/none", "--output", "{tmp}/r"], "does not exist"),
    (["ablate", "--preset", "no-such-preset", "--output", "{tmp}/a"], "unknown preset"),
    (["ablate", "--output", "{tmp}/a"], "give exactly one of --preset"),
    (["cache", "list", "--cache-dir", "{tmp}/none"], "--cache-dir"),
    (["cache", "clear", "--cache-dir", "{tmp}"], "give --all or --older-than"),
    (["inspect", "--teacher", "bundled", "--keep", "auto"], "inspect does not read"),
])
def test_user_errors_are_one_line_and_status_2(capsys, tmp_path, argv, words):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wecolora: error:"), lines
    assert words in lines[0]


def test_a_bad_shard_is_a_user_error(capsys, tmp_path):
    assert main(["ablate", "--preset", "demo", "--quick", "--output", str(tmp_path), "--shard", "1-3"]) == 2
    assert "--shard '1-3' is invalid: expected K/N" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [(None, (0, 1)), ("0/3", (0, 3)), ("2/4", (2, 4))])
def test_parse_shard(text, expected):
    assert cli._parse_shard(text) == expected


@pytest.mark.parametrize("text", ["3", "a/b", "1/2/3", ""])
def test_parse_shard_refuses(text):
    with pytest.raises(UserError, match="expected K/N"):
        cli._parse_shard(text)


@pytest.mark.parametrize("message, expected", [
    ("--data x does not exist", "--data x does not exist"),
    ("two\nlines", "two lines"),
    (("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
      '  File "x.py", line 1, in f\nwecolora.errors.UserError: image a.png is unreadable'), "image a.png is unreadable"),
])
def test_one_line(message, expected):
    assert one_line(UserError(message)) == expected


def test_a_full_disk_is_a_user_error(capsys, monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.md"))

    monkeypatch.setattr(cli.api, "report", full)
    assert main(["report", str(tmp_path), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wecolora: error: cannot write") and "No space left on device" in err
    assert "free some space" in err and len(err.splitlines()) == 1


def test_other_errors_are_not_hidden(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli.api, "report", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["report", str(tmp_path), "--output", str(tmp_path)])


def test_an_interrupt_is_status_130(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.api, "report", interrupted)
    assert main(["report", str(tmp_path), "--output", str(tmp_path)]) == 130
    assert "--resume auto" in capsys.readouterr().err


def test_cache_list_of_an_empty_cache(capsys, tmp_path):
    assert main(["cache", "list", "--cache-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"root": str(tmp_path), "entries": [], "total_bytes": 0}
    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"0 entries, 0 B in {tmp_path}"
    assert main(["cache", "clear", "--all", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"freed 0 B (0 entries) in {tmp_path}"


def test_only_the_first_process_prints(capsys, monkeypatch, tmp_path):
    import logging

    logger = logging.getLogger("wecolora")
    level = logger.level
    monkeypatch.setenv("RANK", "1")
    try:
        assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
        assert capsys.readouterr().out == ""
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(level)  # main() set it; put it back for the tests after this one


def test_report_prints_the_table(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"model": "m", "data": "d", "top1": 0.5, "n_train": 3, "n_test": 4}))
    assert main(["report", str(run), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| run | model | data | top1 % | n_train | n_test |" in out and "| 50.00 |" in out
    assert (tmp_path / "out" / "report.md").read_text().strip() == out.strip()


def test_inspect_a_local_teacher(capsys, teacher_dir):
    assert main(["inspect", "--teacher", f"local-dir:{teacher_dir}", "--reduction", "2", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "kept blocks      [0, 2, 4] (reduction 2, keep first)" in out
    assert "mode             wecolora, rank 4" in out
    assert main(["inspect", "--teacher", f"local-dir:{teacher_dir}", "--reduction", "3", "--keep", "last", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kept_blocks"], info["teacher_blocks"], info["width"]) == ([2, 5], 6, 32)
