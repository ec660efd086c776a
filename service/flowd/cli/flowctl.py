"""The ``flowctl`` command: drive and inspect flows over NATS with FlowClient.

Mutations publish a command and, unless ``--no-wait``, wait for its outcome. Exit codes:
0 ok; 1 rejected command or query error (``code: message`` on stderr); 2 usage;
3 timeout or NATS/flowd unreachable; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from flowd.bus.subjects import valid_prefix
from flowd.client import FlowClient, FlowdError, FlowdUnavailable, Outcome
from flowd.core import door, owner
from flowd.core.errors import InvalidInput

Handler = Callable[[FlowClient, argparse.Namespace], Awaitable[int]]
STEP_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
FLOW_STATUSES = ("created", "running", "waiting", "cancelled", "finished", "failed")
COLOURS = {"finished": "32", "failed": "31", "cancelled": "31", "rejected": "31"}
COLOURS |= {"waiting": "33", "cancel_requested": "33", "created": "36", "started": "36"}
COLOURS |= {"signal_received": "35", "resumed": "36"}


def json_value(text: str) -> Any:
    """An argparse type: any JSON value, inline or as ``@file``, that flowd would accept
    (core.door: UTF-8 without a BOM, no NUL or lone surrogate, numbers within range)."""
    if text.startswith("@"):
        try:
            data = Path(text[1:]).read_bytes()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    else:  # an argument that was not UTF-8 holds lone surrogates: the door says so
        data = text.encode(errors="surrogatepass")
    try:
        return door.read_json(data)
    except door.Unreadable as exc:
        reason = exc.reason.removeprefix("payload is not UTF-8 JSON: ")
        raise argparse.ArgumentTypeError(f"invalid JSON: {reason}") from None
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message.removeprefix("payload ")) from None


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object, inline or as ``@file``."""
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def flow_id(text: str) -> str:
    """An argparse type: a flow id (UUID)."""
    try:
        return str(UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a flow id (UUID): {text!r}") from None


def prefix(text: str) -> str:
    """An argparse type: a subject prefix."""
    try:
        return valid_prefix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def rfc3339(text: str) -> datetime:
    """An argparse type: an RFC 3339 time (``2026-01-02T03:04:05Z``)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None


# -- output ---------------------------------------------------------------------------------------
def _dump(value: Any, pretty: bool = False) -> None:
    print(json.dumps(value, indent=2 if pretty else None, sort_keys=pretty, default=str))


def _paint(text: str, key: str) -> str:
    code = COLOURS.get(key)
    return f"\033[{code}m{text}\033[0m" if code and sys.stdout.isatty() else text


def _line(item: dict[str, Any]) -> str:
    """One human line for an event body (or an outcome body from ``tail --outcomes``)."""
    flow = str(item.get("flow_id") or "-")[:8]
    if "kind" not in item:
        status = str(item.get("status"))
        what = f"{item.get('code')}: {item.get('message')}" if item.get("code") else ""
        return f"{'-' * 12}  {flow}  {_paint(f'{status:<16}', status)}  {what}".rstrip()
    kind, at = str(item["kind"]), str(item.get("at", ""))[11:23]
    status = (item.get("flow") or {}).get("status", "")
    payload = json.dumps(item.get("payload") or {}, separators=(",", ":"))
    payload = payload if len(payload) <= 80 else payload[:77] + "..."
    rev = f"rev {item.get('revision')}"
    return f"{at:<12}  {flow}  {_paint(f'{kind:<16}', kind)}  {rev:<7} {status:<9}  {payload}"


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c) if r.get(c) is not None else "-")[:40] for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    for row in [list(columns), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _report(result: Outcome | str, a: argparse.Namespace) -> int:
    as_json = a.json
    if isinstance(result, str):  # --no-wait: the command id (create: the flow id first)
        text = f"{a.flow_id} {result}" if a.command == "create" else result
        print(json.dumps({"command_id": result, "flow_id": a.flow_id}) if as_json else text)
        return 0
    if as_json:
        _dump(asdict(result))
    elif result.status == "applied":
        status = (result.flow or {}).get("status", "applied")
        print(f"{result.flow_id} {status} rev {result.revision}")
    elif result.status == "unchanged":
        print(f"{result.flow_id} unchanged rev {result.revision}")
    if not result.ok:
        print(f"{result.code}: {result.message}", file=sys.stderr)
        return 1
    return 0


# -- handlers -------------------------------------------------------------------------------------
def _opts(a: argparse.Namespace) -> dict[str, Any]:
    opts = {"command_id": a.command_id, "wait": not a.no_wait, "timeout": a.timeout}
    if getattr(a, "expected_revision", None) is not None:
        opts["expected_revision"] = a.expected_revision
    return opts


async def _mutate(c: FlowClient, a: argparse.Namespace) -> int:
    verb, opts = a.command.replace("-", "_"), _opts(a)
    if verb == "create":
        a.flow_id = a.flow_id or str(uuid4())
        result = await c.create(
            a.controller,
            a.goal,
            a.owner,
            sync_mode="mirrored" if a.mirrored else "managed",
            flow_id=a.flow_id,
            requester_origin=a.origin,
            current_step=a.step,
            state_json=a.state,
            **opts,
        )
    elif verb == "observe":
        result = await c.observe(
            a.flow_id,
            a.run_id,
            a.task,
            a.status,
            child_session_key=a.child_session_key,
            result_json=a.result,
            **opts,
        )
    else:
        result = await c.command(verb, a.flow_id, a.build(a), **opts)
    return _report(result, a)


async def _get(c: FlowClient, a: argparse.Namespace) -> int:
    _dump(await c.get(a.flow_id), pretty=True)
    return 0


async def _list(c: FlowClient, a: argparse.Namespace) -> int:
    flows, after = await c.list(a.owner, a.status, a.limit, a.after)
    if a.json:
        _dump({"flows": flows, "next": after})
        return 0
    _table(flows, ("id", "status", "revision", "current_step", "controller_id", "goal"))
    if after:
        print(f"more: --after {after}", file=sys.stderr)
    return 0


async def _steps(c: FlowClient, a: argparse.Namespace) -> int:
    steps = await c.steps(a.flow_id)
    if a.json:
        _dump(steps)
    else:
        _table(steps, ("run_id", "task", "status", "child_session_key", "updated_at"))
    return 0


async def _events(c: FlowClient, a: argparse.Namespace) -> int:
    for event in await c.events(a.flow_id, a.after_revision, a.limit):
        print(json.dumps(event, default=str) if a.json else _line(event))
    return 0


async def _outcome(c: FlowClient, a: argparse.Namespace) -> int:
    recorded = await c.outcome(a.command_id)
    if recorded is None:
        print(f"not_found: no outcome recorded for {a.command_id}", file=sys.stderr)
        return 1
    _dump(recorded, pretty=not a.json)
    return 0


async def _outbox(c: FlowClient, a: argparse.Namespace) -> int:
    if a.action != "list" and a.row_id is None:
        print(f"usage: flowctl outbox {a.action} ID", file=sys.stderr)
        return 2
    if a.action == "list":
        rows = await c.outbox_parked()
        if a.json:
            _dump({"parked": rows})
        else:
            _table(rows, ("id", "topic", "msg_id", "size", "reason", "since"))
        return 0
    if a.action == "retry":
        result = await c.outbox_retry(a.row_id)
    elif not a.reason:
        print("usage: flowctl outbox skip ID --reason TEXT", file=sys.stderr)
        return 2
    else:
        result = await c.outbox_skip(a.row_id, a.reason)
    _dump(result, pretty=not a.json)
    return 0


async def _tail(c: FlowClient, a: argparse.Namespace) -> int:
    seen = 0
    stream = c.tail(a.flow_id, a.kind, replay=a.replay, since=a.since, include_outcomes=a.outcomes)
    async with aclosing(stream) as items:
        async for item in items:
            print(json.dumps(item) if a.json else _line(item), flush=True)
            seen += 1
            if a.count is not None and seen >= a.count:
                break
    return 0


# -- parser ---------------------------------------------------------------------------------------
def _globals(p: argparse.ArgumentParser, sub: bool) -> None:
    """The global options; on subcommands they default to SUPPRESS so either place works."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if sub else value

    g = p.add_argument_group("connection and output")
    g.add_argument(
        "--nats-url",
        default=default(os.environ.get("NATS_URL", "nats://127.0.0.1:4222")),
        help="NATS server URL(s), comma-separated (env NATS_URL; default nats://127.0.0.1:4222)",
    )
    g.add_argument(
        "--creds",
        default=default(os.environ.get("NATS_CREDS") or None),
        help="NATS credentials file (env NATS_CREDS)",
    )
    g.add_argument(
        "--nkey",
        default=default(os.environ.get("NATS_NKEY") or None),
        help="NATS nkey seed file, for a user known by its nkey alone (env NATS_NKEY)",
    )
    for name, what in (("ca", "CA certificate"), ("cert", "client certificate (mTLS)")):
        g.add_argument(
            f"--tls-{name}",
            default=default(os.environ.get(f"NATS_TLS_{name.upper()}") or None),
            help=f"NATS TLS {what} file (env NATS_TLS_{name.upper()})",
        )
    g.add_argument(
        "--tls-key",
        default=default(os.environ.get("NATS_TLS_KEY") or None),
        help="the client certificate's key file (env NATS_TLS_KEY)",
    )
    g.add_argument(
        "--as-owner",
        default=default(os.environ.get("FLOWCTL_OWNER") or None),
        metavar="OWNER",
        help="sign commands as acting for this owner (env FLOWCTL_OWNER; for FLOWD_ENFORCE_OWNER)",
    )
    g.add_argument(
        "--owner-key-file",
        default=default(os.environ.get("FLOWCTL_OWNER_KEY_FILE") or None),
        help="file holding the owner's key, from `flowctl owner-key` (env FLOWCTL_OWNER_KEY_FILE)",
    )
    g.add_argument(
        "--prefix",
        type=prefix,
        default=default(os.environ.get("FLOWD_PREFIX", "flows")),
        help="subject prefix of the deployment (env FLOWD_PREFIX; default flows)",
    )
    g.add_argument("--json", action="store_true", default=default(False), help="JSON output")
    g.add_argument(
        "--timeout", type=float, default=default(10.0), help="seconds to wait (default 10)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowctl",
        description="Drive and inspect flowd flows over NATS.",
        epilog="exit codes: 0 ok, 1 rejected/error, 2 usage, 3 timeout or unreachable",
    )
    _globals(parser, sub=False)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, text: str, handler: Handler, *examples: str) -> argparse.ArgumentParser:
        epilog = "examples:\n" + "\n".join(f"  flowctl {name} {e}" for e in examples)
        p = subs.add_parser(
            name,
            help=text.split(";")[0],
            description=text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        _globals(p, sub=True)
        return p

    def mutation(
        name: str, text: str, *examples: str, body: Callable[[Any], Any] = lambda a: {}
    ) -> argparse.ArgumentParser:
        """A mutation subcommand; ``body(args)`` builds its payload (create/observe: unused)."""
        p = add(name, text, _mutate, *examples)
        p.set_defaults(build=body)
        if name != "create":
            p.add_argument("flow_id", type=flow_id, metavar="FLOW_ID", help="the flow (UUID)")
        g = p.add_argument_group("command options")
        g.add_argument(
            "--command-id",
            help="idempotency key (default: a new random id); not starting with 'flowd:'. "
            "Reused for another request: idempotency_conflict, exit 1",
        )
        g.add_argument("--no-wait", action="store_true", help="publish, print the command id")
        if name not in ("create", "observe"):
            g.add_argument("--expected-revision", type=int, metavar="N", help="apply only at N")
        return p

    obj: dict[str, Any] = {"type": json_object, "metavar": "JSON"}
    p = mutation(
        "create",
        "create a flow; prints '<flow_id> <status> rev <n>' (with --no-wait: '<flow_id> "
        "<command_id>')",
        "--controller ci --goal 'ship v2' --owner me",
        "--controller ci --goal g --owner me --mirrored --state @state.json --json",
    )
    p.add_argument("--controller", required=True, help="controller_id")
    p.add_argument("--goal", required=True, help="what the flow is for")
    p.add_argument("--owner", required=True, help="owner_session_key")
    p.add_argument("--origin", help="requester_origin")
    p.add_argument("--step", help="current_step")
    p.add_argument("--state", help="initial state_json (JSON object or @file)", **obj)
    p.add_argument("--id", dest="flow_id", type=flow_id, help="the flow's id (default: new)")
    p.add_argument("--mirrored", action="store_true", help="a mirrored flow (born running)")
    mutation("start", "created -> running", "$ID", "$ID --expected-revision 0")
    p = mutation(
        "wait",
        "running -> waiting",
        """$ID --wait-json '{"kind": "approval"}'""",
        body=lambda a: {"wait_json": a.wait_json},
    )
    p.add_argument("--wait-json", required=True, help="what it waits for (JSON or @file)", **obj)
    p = mutation(
        "resume",
        "waiting -> running",
        """$ID --patch '{"approved": true}'""",
        body=lambda a: {"state_patch": a.patch},
    )
    p.add_argument("--patch", help="state patch, shallow-merged (JSON object or @file)", **obj)
    p = mutation(
        "finish",
        "running -> finished",
        """$ID --state '{"released": true}'""",
        body=lambda a: {"final_state": a.state},
    )
    p.add_argument("--state", help="final state patch (JSON object or @file)", **obj)
    p = mutation(
        "fail",
        "running/waiting -> failed",
        "$ID --reason 'tests failed'",
        body=lambda a: {"reason": a.reason},
    )
    p.add_argument("--reason", required=True, help="why it failed")
    mutation("request-cancel", "record a sticky cancel intent", "$ID")
    mutation("cancel", "any non-terminal status -> cancelled", "$ID --no-wait")
    p = mutation(
        "update",
        "merge a state patch",
        "$ID --patch @p.json --next-step build",
        body=lambda a: {"patch": a.patch} | ({"next_step": a.next_step} if a.next_step else {}),
    )
    p.add_argument("--patch", required=True, help="state patch (JSON object or @file)", **obj)
    p.add_argument("--next-step", help="new current_step")
    p = mutation(
        "signal",
        "wake the flow if it waits for this signal, else keep it for its next wait",
        """$ID approve --payload '{"by": "ops"}'""",
        body=lambda a: {"name": a.name} | ({} if a.payload is None else {"payload": a.payload}),
    )
    p.add_argument("name", metavar="NAME", help="the signal's name")
    p.add_argument("--payload", type=json_value, metavar="JSON", help="any JSON, or @file")
    p = mutation("observe", "report one run of an external job", "$ID --run-id r1 --task build")
    p.add_argument("--run-id", required=True, help="the run's id (upsert key)")
    p.add_argument("--task", required=True, help="what the run does")
    p.add_argument("--status", choices=STEP_STATUSES, default="running", help="default running")
    p.add_argument("--child-session-key", help="session key of the run")
    p.add_argument("--result", type=json_value, metavar="JSON", help="result (JSON or @file)")

    p = add("get", "print a flow as JSON", _get, "$ID")
    p.add_argument("flow_id", type=flow_id, metavar="FLOW_ID")
    p = add("list", "list flows, one page", _list, "--status running", "--owner me --json")
    p.add_argument("--owner", help="only flows of this owner_session_key")
    p.add_argument("--status", choices=FLOW_STATUSES, help="only flows in this status")
    p.add_argument("--limit", type=int, default=100, help="page size, 1-1000 (default 100)")
    p.add_argument("--after", metavar="FLOW_ID", help="start after this id (next page)")
    p = add("steps", "list a flow's steps", _steps, "$ID")
    p.add_argument("flow_id", type=flow_id, metavar="FLOW_ID")
    p = add("events", "print a flow's audit events", _events, "$ID --after-revision 3")
    p.add_argument("flow_id", type=flow_id, metavar="FLOW_ID")
    p.add_argument("--after-revision", type=int, default=-1, metavar="N", help="default -1")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p = add("outcome", "print the recorded outcome of a command", _outcome, "c-42")
    p.add_argument("command_id", metavar="COMMAND_ID", help="the command's id")
    p = add(
        "tail",
        "follow events as they happen",
        _tail,
        "",
        "$ID --replay",
        "--kind failed --kind cancelled --since 2026-01-02T00:00:00Z",
        "$ID --replay --count 5 --json",
    )
    p.add_argument("flow_id", type=flow_id, nargs="?", metavar="FLOW_ID", help="default: all")
    p.add_argument("--kind", action="append", metavar="KIND", help="only this kind (repeatable)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--replay", action="store_true", help="start with every retained event")
    start.add_argument(
        "--since", type=rfc3339, metavar="RFC3339", help="start at this time (UTC without offset)"
    )
    p.add_argument("--outcomes", action="store_true", help="also rejected/unchanged outcomes")
    p.add_argument("--count", type=positive, metavar="N", help="exit after N events")
    p = add(
        "outbox",
        "list the outbox rows the relay parked (messages NATS will not take: their flow's "
        "later events wait behind them); retry one (e.g. after raising the limit) or skip it: "
        "a copy goes to <prefix>.dlq.evt with the reason, the row is removed and its flow's "
        "events go on",
        _outbox,
        "",
        "retry 42",
        "skip 42 --reason 'state too big, fixed by hand'",
    )
    p.add_argument(
        "action", nargs="?", choices=("list", "retry", "skip"), default="list", help="default list"
    )
    p.add_argument("row_id", type=positive, nargs="?", metavar="ID", help="the parked row's id")
    p.add_argument("--reason", help="why it is skipped (skip; kept in the dead letter)")
    p = add(
        "owner-key",
        "print the key an owner signs its commands with (FLOWD_ENFORCE_OWNER), derived from "
        "the daemon's current master key (the first of FLOWD_OWNER_KEYS_FILE); hand it to "
        "that owner's clients only (--owner-key-file, FlowClient(owner_key=bytes.fromhex(…)))",
        _no_handler,
        "session-7 --master-key-file /etc/flowd/owner-keys > session-7.key",
    )
    p.add_argument("owner_name", metavar="OWNER", help="the owner (owner_session_key)")
    p.add_argument("--master-key-file", required=True, help="the daemon's FLOWD_OWNER_KEYS_FILE")
    return parser


async def _no_handler(client: FlowClient, args: argparse.Namespace) -> int:
    raise AssertionError("handled in main, without NATS")


def _nats_options(args: argparse.Namespace) -> dict[str, Any]:
    """nats.connect options for the authentication the arguments name."""
    options: dict[str, Any] = {"error_cb": _quiet}
    if args.creds:
        options["user_credentials"] = args.creds
    if args.nkey:
        options["nkeys_seed"] = args.nkey
    if args.tls_ca or args.tls_cert:
        try:
            tls = ssl.create_default_context(cafile=args.tls_ca)
            if args.tls_cert:
                tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"TLS files: {exc}") from None
        options["tls"] = tls
    return options


def _owner(args: argparse.Namespace) -> dict[str, Any]:
    """FlowClient's owner options from ``--as-owner`` / ``--owner-key-file``."""
    if not args.as_owner and not args.owner_key_file:
        return {}
    if not (args.as_owner and args.owner_key_file):
        raise ValueError("--as-owner and --owner-key-file go together")
    return {"owner": args.as_owner, "owner_key": bytes.fromhex(_read(args.owner_key_file))}


def _read(path: str) -> str:
    """A key file's text; ValueError (a usage error) if it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeError) as exc:
        raise ValueError(str(exc)) from None


def _owner_key(args: argparse.Namespace) -> int:
    """``flowctl owner-key``: an owner's key, derived from a master key (no NATS needed)."""
    masters = owner.parse_keys(_read(args.master_key_file))
    print(owner.owner_key(masters[0], args.owner_name).hex())
    return 0


async def _run(args: argparse.Namespace) -> int:
    connecting = FlowClient.connect(
        args.nats_url,
        prefix=args.prefix,
        request_timeout=args.timeout,
        **_owner(args),
        **_nats_options(args),
    )
    try:
        client = await asyncio.wait_for(connecting, args.timeout)
    except TimeoutError:
        raise FlowdUnavailable(f"no NATS at {args.nats_url} within {args.timeout:g} s") from None
    async with client:
        handler: Handler = args.handler
        return await handler(client, args)


async def _quiet(exc: Exception) -> None:
    """Keep nats-py from logging every failed (re)connect attempt."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowctl`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "owner-key":
            return _owner_key(args)
        return asyncio.run(_run(args))
    except FlowdError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"timeout: {str(exc) or 'no answer in time'}", file=sys.stderr)
        return 3
    except FlowdUnavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:  # input the client refuses before sending (e.g. a long id)
        print(f"invalid_input: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
