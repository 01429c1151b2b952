#!/usr/bin/env bash
# Issue 9, by hand: an aa-demo node SIGKILLed at random moments, restarted each time, then run
# to the end; its state digest must equal an uninterrupted run's of the same seed.
#
#   scripts/kill-restart.sh [--triggers N] [--seed S] [--kills K] [--sql mysql://u:p@host:port/db]
#                           [--kill-seed R] [--dir DIR] [--keep]
#
# 1. `aa-demo run --data D --triggers N --seed S --gc-every 100000`, SIGKILLed K times in a
#    row, each time at a random moment drawn from --kill-seed (a schedule replays, up to timing):
#    1 run in 8 is killed 0-60 ms after it starts (inside opening and recovery); the others a
#    random 0-5 ms after their n-th committed trigger, n random: mostly up to twice a share of
#    what is left of the queue, 1 run in 8 four to sixteen times that share, so that the next
#    recovery fences many sagas at once (issue 9's bug showed with 74 and with 91). Counting
#    triggers rather than milliseconds spreads the kills over the whole queue, however fast the
#    machine. GC that rare leaves every saga of a run for the next recovery to decide.
# 2. A clean `aa-demo run` to the end, then `aa-demo verify`. Every run is bounded by
#    RUN_TIMEOUT seconds (default 600): a node that spins fails the script instead of hanging it.
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

triggers=1500 seed=11 kills=50 sql="" kill_seed=1 dir="" keep=0
while [ $# -gt 0 ]; do
    case "$1" in
    --triggers) triggers=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --kills) kills=$2; shift 2 ;;
    --sql) sql=$2; shift 2 ;;
    --kill-seed) kill_seed=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
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

echo "==> aa-demo ${run_args[*]}: $kills SIGKILLs at random moments (kill seed $kill_seed)${sql:+, SQL in MariaDB}"
RANDOM=$kill_seed
# r = 0 ... $1. Not in a subshell: bash reseeds RANDOM there, and the schedule would not replay.
rand() { r=$(( (RANDOM * 32768 + RANDOM) % ($1 + 1) )); }
fifo="$dir/out.fifo"
mkfifo "$fifo"
killed=0 finished=0 queued=$triggers
for i in $(seq 1 "$kills"); do
    [[ "$queued" =~ ^[0-9]+$ ]] || queued=$triggers
    share=$(( queued / (3 * (kills - i + 1)) )); [ "$share" -ge 1 ] || share=1
    rand 7; pick=$r
    rand 5; extra=$r
    if [ "$pick" -eq 0 ]; then
        rand 60; delay=$r n=0 plan="$r ms after the start"
    elif [ "$pick" -eq 1 ]; then
        rand $((12 * share)); n=$(( 4 * share + r )) plan="after committed trigger $n (+${extra} ms)"
    else
        rand $((2 * share)); n=$(( 1 + r )) plan="after committed trigger $n (+${extra} ms)"
    fi
    echo "--- run $i (kill $plan)" >>"$log"
    "$demo" "${run_args[@]}" >"$fifo" 2>>"$log" &
    pid=$!
    # The reader copies the run's output to the log and, in the count mode, kills the run a
    # few milliseconds after its n-th committed trigger; it reads on to the end, so that the
    # run never dies of a closed pipe.
    awk -v n="$n" -v pid="$pid" -v extra="$extra" '
        { print; fflush() }
        n > 0 && !done && /^committed / { if (++c >= n) { done = 1; system("sleep 0.00" extra "; kill -KILL " pid " 2>/dev/null") } }
    ' <"$fifo" >>"$log" &
    reader=$!
    # A run that neither reaches its kill nor ends (a node that spins) fails the script.
    rm -f "$dir/watchdog"
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        sleep "${RUN_TIMEOUT:-600}" & nap=$!
        wait "$nap"
        touch "$dir/watchdog"
        kill -KILL "$pid" 2>/dev/null
    ) >/dev/null 2>&1 &
    watchdog=$!
    if [ "$n" -eq 0 ]; then
        sleep "0.$(printf '%03d' "$delay")"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    status=0
    wait "$pid" 2>/dev/null || status=$?
    wait "$reader" 2>/dev/null || true
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    if [ -e "$dir/watchdog" ]; then
        echo "FAIL: run $i neither reached its kill nor ended within ${RUN_TIMEOUT:-600} s; the end of its output:" >&2
        sed -n "/^--- run $i /,\$p" "$log" | tail -30 >&2
        exit 1
    fi
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
    queued=$(queued_of)
    echo "kill $i/$kills $plan: $outcome; recovery at open: $decided; committed $(grep -c "^committed " <<<"$section" || true); queued $queued"
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
