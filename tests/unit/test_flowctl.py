"""flowctl's command line, without servers: help, argument parsing, usage errors, exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from flowd.cli.flowctl import build_parser, json_object, json_value, main

FLOW = "6f1c0a8e-2a7b-4c39-9d7e-1b2f3c4d5e6f"
UNREACHABLE = ["--nats-url", "nats://127.0.0.1:1", "--timeout", "0.5"]
GLOBAL = ("--nats-url", "--prefix", "--json", "--timeout")
MUTATION = ("--command-id", "--no-wait")

OPTIONS: dict[str, tuple[str, ...]] = {
    "create": (*MUTATION, "--controller", "--goal", "--owner", "--state", "--id", "--mirrored"),
    "start": (*MUTATION, "--expected-revision", "FLOW_ID"),
    "wait": (*MUTATION, "--expected-revision", "--wait-json"),
    "resume": (*MUTATION, "--expected-revision", "--patch"),
    "finish": (*MUTATION, "--expected-revision", "--state"),
    "fail": (*MUTATION, "--expected-revision", "--reason"),
    "request-cancel": (*MUTATION, "--expected-revision"),
    "cancel": (*MUTATION, "--expected-revision"),
    "update": (*MUTATION, "--expected-revision", "--patch", "--next-step"),
    "signal": (*MUTATION, "--expected-revision", "NAME", "--payload"),
    "observe": (*MUTATION, "--run-id", "--task", "--status", "--child-session-key", "--result"),
    "get": ("FLOW_ID",),
    "list": ("--owner", "--status", "--limit", "--after"),
    "steps": ("FLOW_ID",),
    "events": ("--after-revision", "--limit"),
    "outcome": ("COMMAND_ID",),
    "tail": ("--kind", "--replay", "--since", "--outcomes", "--count"),
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_subcommand_has_help_with_its_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in (*OPTIONS[command], *GLOBAL):
        assert option in text, (command, option)
    assert f"flowctl {command}" in text.split("examples:")[1]


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(command in text for command in OPTIONS)
    assert "exit codes" in text


def test_console_module_runs() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "flowd.cli.flowctl", "tail", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0
    assert "--replay" in run.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["update", FLOW, "--patch", "{bad"], "argument --patch: invalid JSON"),
        (["update", FLOW, "--patch", "[1, 2]"], "expected a JSON object, got list"),
        (["wait", FLOW, "--wait-json", "@/nonexistent/w.json"], "cannot read /nonexistent"),
        (["create", "--controller", "c", "--goal", "g", "--owner", "o", "--state", "3"], "int"),
        (["observe", FLOW, "--run-id", "r", "--task", "t", "--result", "{"], "invalid JSON"),
        (["update", FLOW, "--patch", '{"a": 1e400}'], "refused: a: number beyond the range"),
        (["update", FLOW, "--patch", '{"a": "\\u0000"}'], "refused: a: string contains NUL"),
        (["update", FLOW, "--patch", '{"a": NaN}'], "invalid JSON: NaN is not JSON"),
        (["update", FLOW, "--patch", '{"a": "\udcff"}'], "invalid JSON: invalid UTF-8 at byte"),
        (["signal", FLOW], "NAME"),
        (["get", "not-a-uuid"], "not a flow id (UUID): 'not-a-uuid'"),
        (["--prefix", "a.b", "get", FLOW], "subject prefix must match"),
        (["tail", "--since", "yesterday"], "not an RFC 3339 time"),
        (["tail", "--replay", "--since", "2026-01-01T00:00:00Z"], "not allowed with"),
        (["fail", FLOW], "--reason"),
        (["observe", FLOW, "--run-id", "r", "--task", "t", "--status", "done"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "body"),
    [
        (["start", FLOW, "--expected-revision", "0"], {}),
        (["wait", FLOW, "--wait-json", '{"kind": "manual"}'], {"wait_json": {"kind": "manual"}}),
        (["resume", FLOW], {"state_patch": None}),
        (["resume", FLOW, "--patch", "{}"], {"state_patch": {}}),
        (["finish", FLOW, "--state", '{"a": 1}'], {"final_state": {"a": 1}}),
        (["fail", FLOW, "--reason", ""], {"reason": ""}),
        (
            ["update", FLOW, "--patch", '{"p": 1}', "--next-step", "b"],
            {"patch": {"p": 1}, "next_step": "b"},
        ),
        (["update", FLOW, "--patch", "{}"], {"patch": {}}),
        (["signal", FLOW, "go", "--payload", "[1]"], {"name": "go", "payload": [1]}),
        (["signal", FLOW, "go"], {"name": "go"}),
        (["request-cancel", FLOW], {}),
        (["cancel", FLOW, "--no-wait"], {}),
    ],
)
def test_mutations_build_their_payloads(argv: list[str], body: dict[str, object]) -> None:
    args = build_parser().parse_args(argv)
    assert args.build(args) == body


def test_json_arguments_read_files(tmp_path: Path) -> None:
    path = tmp_path / "patch.json"
    path.write_text('{"progress": 0.5, "tags": ["a"]}')
    assert json_object(f"@{path}") == {"progress": 0.5, "tags": ["a"]}
    assert json_object('{"a": null}') == {"a": None}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert json_value(f"@{tmp_path / 'list.json'}") == [1, 2]
    assert json_value('"text"') == "text"
    with pytest.raises(argparse.ArgumentTypeError, match="expected a JSON object"):
        json_object(f"@{tmp_path / 'list.json'}")


def test_valid_arguments_get_past_parsing_to_the_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With good arguments (global options after the subcommand too) flowctl tries to
    connect; nothing listens, so it exits 3 with one line on stderr."""
    path = tmp_path / "patch.json"
    path.write_text('{"step": 2}')
    argv = ["update", FLOW, "--patch", f"@{path}", "--json", "--expected-revision", "3"]
    assert main([*argv, *UNREACHABLE]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("unavailable:")
    assert "nats://127.0.0.1:1" in err
    assert len(err.splitlines()) == 1


def test_environment_provides_connection_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("FLOWD_PREFIX", "not.valid")
    assert main(["get", FLOW]) == 2  # the prefix from the environment is validated too
    assert "subject prefix must match" in capsys.readouterr().err
    monkeypatch.setenv("FLOWD_PREFIX", "tenant-a")
    assert main(["--timeout", "0.5", "list"]) == 3
    assert "nats://127.0.0.1:1" in capsys.readouterr().err
