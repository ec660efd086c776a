#!/usr/bin/env bash
# `make run`: start flowd on embedded servers and drive a short live demo through flowctl:
# a managed flow driven to finished, a mirrored flow fed by three observations, a flow woken
# by a timer and one by a signal, with every event tailed on screen. Stops cleanly.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=${FLOWD_DATA_DIR:-.flowd/demo}
export FLOWD_PREFIX=${FLOWD_PREFIX:-demo}
export FLOWD_HTTP_PORT=${FLOWD_HTTP_PORT:-8321}
mkdir -p "$DATA" && rm -f "$DATA/urls.env"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting flowd (embedded NATS + PostgreSQL under $DATA)"
env -u NATS_URL -u DATABASE_URL FLOWD_DATA_DIR="$DATA" FLOWD_LOG_FORMAT=console \
    "$BIN/flowd" run >"$DATA.log" 2>&1 &
FLOWD=$!
TAIL=
cleanup() {
    [ -n "$TAIL" ] && kill "$TAIL" 2>/dev/null || true
    if kill -0 "$FLOWD" 2>/dev/null; then kill -TERM "$FLOWD"; wait "$FLOWD" || true; fi
}
trap cleanup EXIT

for _ in $(seq 1 300); do
    if [ -f "$DATA/urls.env" ] && curl -fs "http://127.0.0.1:$FLOWD_HTTP_PORT/readyz" >/dev/null 2>&1; then
        break
    fi
    kill -0 "$FLOWD" 2>/dev/null || { echo "flowd exited; its log:"; cat "$DATA.log"; exit 1; }
    sleep 0.1
done
set -a; . "$DATA/urls.env"; set +a
echo "flowd is ready: NATS_URL=$NATS_URL  metrics: http://127.0.0.1:$FLOWD_HTTP_PORT/metrics"

say "tailing every event (flowctl tail)"
"$BIN/flowctl" tail --outcomes &
TAIL=$!
sleep 0.5
ctl() { echo "\$ flowctl $*" >&2; "$BIN/flowctl" "$@"; }

say "a managed flow, driven to finished"
M=$(python3 -c 'import uuid; print(uuid.uuid4())')
ctl create --id "$M" --controller deployer --goal "ship v2" --owner demo --state '{"env": "prod"}'
ctl start "$M"
ctl update "$M" --patch '{"progress": 0.5}' --next-step build
ctl wait "$M" --wait-json '{"kind": "manual"}'
ctl resume "$M" --patch '{"approved_by": "ops"}'
ctl finish "$M" --state '{"released": true}'

say "a mirrored flow, fed by three observations of a nightly backup job"
R=$(python3 -c 'import uuid; print(uuid.uuid4())')
ctl create --id "$R" --mirrored --controller cron --goal "nightly backup" --owner demo
ctl observe "$R" --run-id run-1 --task dump --status running
ctl observe "$R" --run-id run-1 --task dump --status succeeded --result '{"bytes": 1048576}'
ctl observe "$R" --run-id run-2 --task upload --status running
ctl steps "$R"

say "a flow woken by a timer, and one by a signal sent before it waited"
T=$(python3 -c 'import uuid; print(uuid.uuid4())')
ctl create --id "$T" --controller demo --goal "wait two seconds" --owner demo
ctl start "$T"
AT=$(python3 -c 'import datetime as d; print((d.datetime.now(d.UTC) + d.timedelta(seconds=2)).isoformat())')
ctl wait "$T" --wait-json "{\"kind\": \"timer\", \"at\": \"$AT\"}"
S=$(python3 -c 'import uuid; print(uuid.uuid4())')
ctl create --id "$S" --controller demo --goal "wait for approval" --owner demo
ctl start "$S"
ctl signal "$S" approve --payload '{"by": "alice"}'
ctl wait "$S" --wait-json '{"kind": "signal", "name": "approve"}'
sleep 3

say "a command the state machine refuses (finishing a finished flow)"
ctl finish "$M" || echo "(exit code $?: rejected as expected)"

say "the managed flow now"
ctl get "$M"
sleep 0.5
say "stopping flowd (SIGTERM: finish in-flight work, flush the outbox, exit 0)"
kill "$TAIL" 2>/dev/null || true
TAIL=
kill -TERM "$FLOWD"
wait "$FLOWD" && echo "flowd exited 0"
