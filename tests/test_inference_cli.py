"""`aquila generate` and `aquila chat` on a tiny checkpoint."""

import io
import os
import subprocess
import sys

import pytest

from aquila.cli import main as cli_main
from tests.test_inference import load_predictor, single_thread, write_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def predictor(ckpt):
    return load_predictor(ckpt)


def model_args(ckpt):
    return ["--model-dir", str(ckpt.parent), "--model-name", ckpt.name]


def test_generate_greedy_matches_the_predictor(ckpt, predictor, capsys):
    expected = predictor.predict_generate_randomsample("Hello", out_max_length=12, temperature=0)
    assert (
        cli_main(["generate", *model_args(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0"])
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert (
        cli_main(
            [
                "generate",
                *model_args(ckpt),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--stream",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert (
        cli_main(["generate", *model_args(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--beam-size", "1"])
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"


def test_generate_prompt_file_and_int8(ckpt, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("Hello\n北京\n", encoding="utf-8")
    argv = ["generate", *model_args(ckpt), "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "5"]
    assert cli_main([*argv, "--temperature", "0", "--int8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "hi", "--top-p", "0"], "top_p"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "out_max_length"),
        (["--prompt", ""], "empty"),
        (["--prompt", "hi", "--model-name", "missing"], "not found"),
    ],
)
def test_generate_bad_input_is_one_error_line(ckpt, capsys, extra, message):
    assert cli_main(["generate", *model_args(ckpt), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_chat_reads_turns_from_stdin(ckpt, predictor, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\n/reset\nhow are you?\n"))
    argv = ["chat", *model_args(ckpt), "--max-new-tokens", "10", "--temperature", "0"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    first = predictor.predict_chat("hi", out_max_length=10, temperature=0)
    second = predictor.predict_chat("how are you?", out_max_length=10, temperature=0)  # history was reset
    assert out == f"{first}\n(history cleared)\n{second}\n"


class TerminalInput(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_chat_help_command_banner_and_usage(ckpt, predictor, monkeypatch, capsys):
    from aquila.inference.chat import commands_help

    monkeypatch.setattr(sys, "stdin", TerminalInput("/help\nhi\n/exit\nnever read\n"))
    assert cli_main(["chat", *model_args(ckpt), "--max-new-tokens", "10", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    first = predictor.predict_chat("hi", out_max_length=10, temperature=0)  # /help did not become a turn
    assert captured.out == f"> {commands_help()}\n> {first}\n> "
    banner = captured.err.strip().splitlines()
    assert len(banner) == 1 and ckpt.name in banner[0] and all(c in banner[0] for c in ("/help", "/reset", "/exit"))
    with pytest.raises(SystemExit):
        cli_main(["chat", "--help"])
    usage = capsys.readouterr().out
    assert all(c in usage for c in ("/help", "/reset", "/exit", "clear the conversation history"))


@pytest.mark.slow
def test_chat_with_piped_input_in_a_subprocess(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "aquila", "chat", *model_args(ckpt), "--max-new-tokens", "6", "--seed", "0"]
    proc = subprocess.run(cmd, input="hello\nsecond turn\n", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2


def test_generate_flags_combine_or_fail(ckpt, predictor, tmp_path, capsys):
    from aquila.chat_template import STOP_STRINGS

    (tmp_path / "turns.txt").write_text("hi\nhow are you?\n", encoding="utf-8")
    argv = ["generate", *model_args(ckpt), "--max-new-tokens", "8", "--temperature", "0"]
    assert cli_main([*argv, "--prompt-file", str(tmp_path / "turns.txt"), "--chat"]) == 0
    expected = [predictor.predict_chat(t, out_max_length=8, temperature=0) for t in ("hi", "how are you?")]
    assert capsys.readouterr().out.splitlines() == [e.replace("\n", "\\n") for e in expected]

    assert cli_main([*argv, "--prompt", "hi", "--chat", "--beam-size", "2"]) == 0
    chat_beam = predictor.beam(predictor.encode_chat("hi"), 8, 2, stop=STOP_STRINGS, strip=True)
    assert capsys.readouterr().out == chat_beam + "\n"
    assert chat_beam != predictor.beam(predictor.encode_prompt("hi"), 8, 2)

    for extra, message in (
        (["--prompt-file", str(tmp_path / "turns.txt"), "--stream"], "--stream"),
        (["--prompt", "hi", "--stream", "--beam-size", "2"], "beam"),
    ):
        assert cli_main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
