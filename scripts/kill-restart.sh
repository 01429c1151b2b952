#!/usr/bin/env bash
# Issue 9, by hand: an aa-demo node SIGKILLed at random moments, restarted each time, then run
# to the end; its state digest must equal an uninterrupted run's of the same seed.
#
#   scripts/kill-restart.sh [--triggers N] [--seed S] [--kills K] [--sql mysql://u:p@host:port/db]
#                           [--max-delay-ms M] [--kill-seed R] [--dir DIR] [--keep]
#
# 1. `aa-demo run --data D --triggers N --seed S --gc-every 100000`, SIGKILLed after a random
#    delay (0..M ms, drawn from --kill-seed so that a schedule replays), K times in a row. With
#    GC that rare, every restart's recovery fences every saga journaled so far.
# 2. A clean `aa-demo run` to the end (bounded by RUN_TIMEOUT seconds, default 600), then
#    `aa-demo verify`.
# 3. An uninterrupted run of the same seed in another directory (and, with --sql, another
#    database on the same server), then `aa-demo verify`.
# Prints both digests. Exits 0 when they are equal and both verifies pass; 1 otherwise, also
# when a killed run exits non-zero on its own or the clean run fails or times out.
#
# With --sql, two fresh databases (<db>_kr_<pid> and <db>_ref_<pid>) are created on that
# server with the `mariadb` client and dropped on exit (unless --keep). AA_DEMO names the
# binary (default: the debug build, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

triggers=1500 seed=11 kills=50 sql="" max_delay_ms=100 kill_seed=1 dir="" keep=0
while [ $# -gt 0 ]; do
    case "$1" in
    --triggers) triggers=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --kills) kills=$2; shift 2 ;;
    --sql) sql=$2; shift 2 ;;
    --max-delay-ms) max_delay_ms=$2; shift 2 ;;
    --kill-seed) kill_seed=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

demo=${AA_DEMO:-}
if [ -z "$demo" ]; then
    demo=".build/debug/aa-demo"
    [ -x "$demo" ] || swift build --product aa-demo 2>&1 | grep -v "^\[" || true
fi
[ -x "$demo" ] || { echo "aa-demo not found at $demo" >&2; exit 2; }

if [ -z "$dir" ]; then dir=$(mktemp -d /tmp/kill-restart-XXXXXX); else mkdir -p "$dir"; fi
node="$dir/node" ref="$dir/ref" log="$dir/runs.log"
rm -rf "$node" "$ref"
: >"$log"

node_sql=() ref_sql=() dbs=()
mysql_client() { :; }
if [ -n "$sql" ]; then
    re='^(mysql|mariadb)://([^:@/]+)(:([^@/]*))?@([^:/?]*)(:([0-9]+))?/([A-Za-z0-9_]+)(\?socket=(.*))?$'
    [[ "$sql" =~ $re ]] || { echo "cannot parse --sql $sql (mysql://user:password@host:port/db)" >&2; exit 2; }
    m_user=${BASH_REMATCH[2]} m_pass=${BASH_REMATCH[4]} m_host=${BASH_REMATCH[5]}
    m_port=${BASH_REMATCH[7]:-3306} m_db=${BASH_REMATCH[8]} m_socket=${BASH_REMATCH[10]}
    conn=(--no-defaults -u"$m_user" -p"$m_pass")
    if [ -n "$m_socket" ]; then conn+=(--socket="$m_socket"); else conn+=(-h"$m_host" -P"$m_port" --protocol=TCP); fi
    mysql_client() { mariadb "${conn[@]}" -e "$1"; }
    base=${sql%%\?*}; base=${base%/*}; query=""
    [ -n "$m_socket" ] && query="?socket=$m_socket"
    kr_db="${m_db}_kr_$$" ref_db="${m_db}_ref_$$"
    for db in "$kr_db" "$ref_db"; do mysql_client "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"; dbs+=("$db"); done
    node_sql=(--sql "$base/$kr_db$query")
    ref_sql=(--sql "$base/$ref_db$query")
fi

cleanup() {
    if [ "$keep" = 0 ]; then
        for db in "${dbs[@]}"; do mysql_client "DROP DATABASE IF EXISTS $db" 2>/dev/null || true; done
        rm -rf "$dir"
    else
        echo "kept: $dir${dbs[*]:+ and databases ${dbs[*]}}"
    fi
}
trap cleanup EXIT

run_args=(run --data "$node" "${node_sql[@]}" --triggers "$triggers" --seed "$seed" --gc-every 100000)
digest_of() { sed -n 's/^digest //p' <<<"$1" | tail -1; }
queued_of() { local q; q=$("$demo" verify --data "$node" "${node_sql[@]}" 2>/dev/null | sed -n 's/.*queued: \([0-9]*\).*/\1/p'); echo "${q:-?}"; }

echo "==> aa-demo ${run_args[*]}: $kills SIGKILLs after 0..${max_delay_ms} ms (kill seed $kill_seed)${sql:+, SQL in MariaDB}"
RANDOM=$kill_seed
killed=0 finished=0
for i in $(seq 1 "$kills"); do
    delay=$(( (RANDOM * 32768 + RANDOM) % (max_delay_ms + 1) ))
    echo "--- run $i (kill after ${delay} ms)" >>"$log"
    "$demo" "${run_args[@]}" >>"$log" 2>&1 &
    pid=$!
    sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
    kill -KILL "$pid" 2>/dev/null || true
    status=0
    wait "$pid" 2>/dev/null || status=$?
    if [ "$status" -eq 137 ]; then
        killed=$((killed + 1))
        outcome="killed"
    elif [ "$status" -eq 0 ]; then
        finished=$((finished + 1))
        outcome="finished before the kill"
    else
        echo "FAIL: run $i exited on its own with status $status before its kill; its output:" >&2
        sed -n "/^--- run $i /,\$p" "$log" | tail -30 >&2
        exit 1
    fi
    section=$(sed -n "/^--- run $i /,\$p" "$log")
    decided=$(sed -n 's/^recovery at open: .*; recovery: \([0-9]*\) committed, \([0-9]*\) compensated, \([0-9]*\) in doubt.*/\1 committed, \2 compensated, \3 in doubt/p' <<<"$section")
    if [ -z "$decided" ]; then
        if grep -q "^recovery at open: " <<<"$section"; then decided="nothing to decide"; else decided="not finished"; fi
    fi
    echo "kill $i/$kills after ${delay} ms: $outcome; recovery at open: $decided; committed $(grep -c "^committed " <<<"$section" || true); queued $(queued_of)"
done
echo "==> $killed SIGKILLs landed, $finished run(s) finished first"

echo "==> clean run to the end"
status=0
out=$(timeout "${RUN_TIMEOUT:-600}" "$demo" "${run_args[@]}" 2>"$dir/clean.err") || status=$?
grep -v "^committed " <<<"$out" || true
grep -v "^committed \|^[0-9-]*T[0-9:+]* notice " "$dir/clean.err" | tail -20 || true
echo "(clean run: $(grep -c "^committed " <<<"$out" || true) trigger(s) committed, exit status $status)"
if [ "$status" -ne 0 ]; then
    [ "$status" -eq 124 ] && echo "FAIL: the clean run did not finish within ${RUN_TIMEOUT:-600} s" >&2 \
        || echo "FAIL: the clean run exited with status $status" >&2
    exit 1
fi
verify_status=0
verify=$("$demo" verify --data "$node" "${node_sql[@]}" 2>&1) || verify_status=$?
echo "$verify"
killed_digest=$(digest_of "$verify")

echo "==> uninterrupted reference run"
"$demo" run --data "$ref" "${ref_sql[@]}" --triggers "$triggers" --seed "$seed" >"$dir/ref.out" 2>&1 \
    || { echo "FAIL: the reference run failed:" >&2; tail -20 "$dir/ref.out" >&2; exit 1; }
ref_status=0
ref_verify=$("$demo" verify --data "$ref" "${ref_sql[@]}" 2>&1) || ref_status=$?
ref_digest=$(digest_of "$ref_verify")

echo "digest after $killed kills: ${killed_digest:-none}"
echo "digest uninterrupted:     ${ref_digest:-none}"
if [ "$verify_status" -ne 0 ] || [ "$ref_status" -ne 0 ]; then
    echo "FAIL: verify failed (killed node: $verify_status, reference: $ref_status)" >&2
    [ "$ref_status" -ne 0 ] && echo "$ref_verify" >&2
    exit 1
fi
if [ -z "$killed_digest" ] || [ "$killed_digest" != "$ref_digest" ]; then
    echo "FAIL: the digests differ" >&2
    exit 1
fi
echo "OK: same digest"
