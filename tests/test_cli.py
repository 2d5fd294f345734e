"""`shoal generate` as a user runs it: prompts from arguments, a file, JSONL or stdin."""

import json
import subprocess
import sys

import pytest


def run_cli(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "shoal.cli", "--log-level", "WARNING", "generate", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_args(tiny_dirs) -> list[str]:
    return ["--model", tiny_dirs["llama"], "--kv-cache-memory", "16MB", "--max-tokens", "5", "--jsonl"]


def test_prompts_from_arguments(model_args):
    result = run_cli([*model_args, "hello there", "second prompt"])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["hello there", "second prompt"]
    assert "tokens/s" in result.stderr


def test_prompts_from_a_text_file_and_a_jsonl_file(model_args, tmp_path):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first\n\nsecond\n")
    jsonl_file = tmp_path / "prompts.jsonl"
    jsonl_file.write_text(json.dumps({"prompt": "first"}) + "\n" + json.dumps({"prompt": "second"}) + "\n")
    outs = []
    for path in (text_file, jsonl_file):
        result = run_cli([*model_args, "--file", str(path)])
        assert result.returncode == 0, result.stderr
        outs.append([json.loads(line) for line in result.stdout.splitlines()])
    assert outs[0] == outs[1] and [o["prompt"] for o in outs[0]] == ["first", "second"]


def test_prompts_from_stdin(model_args):
    result = run_cli(model_args, stdin="from stdin\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["prompt"] == "from stdin"


def test_bad_input_gives_a_clear_error_not_a_traceback(model_args, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    result = run_cli([*model_args, "--file", str(bad)])
    assert (
        result.returncode == 2
        and 'needs a "prompt" field' in result.stderr
        and "Traceback" not in result.stderr
    )
    missing = run_cli(["--model", str(tmp_path / "nowhere"), "hi"])
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "nowhere" in missing.stderr


def test_no_prompts_anywhere_runs_the_built_in_examples(model_args):
    from shoal.cli import EXAMPLE_PROMPTS

    result = run_cli(model_args, stdin="")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == EXAMPLE_PROMPTS


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (lambda d: ["--file", str(d / "missing.txt")], "cannot read --file"),
        (lambda d: ["--file", str(_write(d / "five.jsonl", '{"prompt": 5}\n'))], "holding a string"),
        (lambda d: ["--file", str(_write(d / "latin1.txt", b"caf\xe9\n"))], "is not UTF-8 text"),
        (lambda d: ["--temperature", "1e-300", "hi"], "temperature must be 0 (greedy) or between"),
    ],
)
def test_bad_prompt_files_and_flags_are_clear_errors(model_args, tmp_path, capsys, setup, words):
    from shoal.cli import main

    assert main([*_QUIET, "generate", *model_args, *setup(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


_QUIET = ["--log-level", "WARNING"]


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_serve_takes_the_model_as_vllm_serve_does_or_by_flag(capsys):
    from shoal.cli import build_parser
    from shoal.server.cli import resolve_model_argument

    for argv in (
        ["serve", "model.gguf"],
        ["serve", "--model", "model.gguf"],
        ["serve", "model.gguf", "-m", "model.gguf"],
    ):
        args = build_parser().parse_args(argv)
        resolve_model_argument(args)
        assert args.model == "model.gguf", argv
    args = build_parser().parse_args(["serve", "a.gguf", "--model", "b.gguf"])
    assert args.func(args) == 2  # refused before anything loads
    assert "two models given (a.gguf and --model b.gguf)" in capsys.readouterr().err
