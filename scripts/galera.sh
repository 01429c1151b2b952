#!/usr/bin/env bash
# A throwaway 3-node MariaDB Galera cluster on loopback, no systemd: one directory per node
# (DIR/node1..3: datadir, tmpdir, socket, log), servers run as the `mysql` user (rsync state
# transfer fails as root), a real user with a password.
#   scripts/galera.sh start DIR [BASEPORT]  starts 3 nodes; prints the multi-host mysql:// URL last
#   scripts/galera.sh stop DIR              stops every node (SIGTERM, then waits), keeps DIR
#   scripts/galera.sh kill DIR N            kill -9 of node N, waits until it is gone
#   scripts/galera.sh start-node DIR N      starts node N again; it rejoins and syncs (IST/SST)
#   scripts/galera.sh stop-node DIR N       clean stop of node N
#   scripts/galera.sh url DIR [N]           the cluster's URL, or node N's alone
#   scripts/galera.sh status DIR N          node N's wsrep_cluster_size and wsrep_local_state_comment
# Ports: BASEPORT+N (SQL), +10+N (group communication), +20+N (IST), +30+N (SST), N = 1..3.
# Fast start: every node starts from a copy of one template datadir (installed and bootstrapped
# once, cleanly shut down, cached in SAGA_GALERA_TEMPLATE, default /tmp/saga-galera-template):
# the joiners hold the bootstrap node's exact state, so no state transfer copies anything. Short
# group-communication timeouts let the cluster notice a killed or hung node in a few seconds.
set -euo pipefail
usage="usage: galera.sh start|stop|kill|start-node|stop-node|url|status DIR [N|BASEPORT]"
cmd=${1:?$usage}
dir=${2:?$usage}
user=saga
password=saga-test-pw
database=saga
nodes=(1 2 3)
provider=/usr/lib/galera/libgalera_smm.so
template=${SAGA_GALERA_TEMPLATE:-/tmp/saga-galera-template}

need() {
    command -v mariadbd >/dev/null || { echo "mariadbd not found: install mariadb-server (scripts/setup.sh does)" >&2; exit 1; }
    [ -f "$provider" ] || { echo "$provider not found: install galera-4 (scripts/setup.sh does)" >&2; exit 1; }
    command -v rsync >/dev/null || { echo "rsync not found: install rsync (scripts/setup.sh does)" >&2; exit 1; }
}

base() { cat "$dir/baseport"; }
sqlport() { echo $(( $(base) + $1 )); }
gport() { echo $(( $(base) + 10 + $1 )); }
node_dir() { echo "$dir/node$1"; }
pidfile() { echo "$(node_dir "$1")/mariadbd.pid"; }
ping_node() { mariadb-admin --no-defaults --socket="$(node_dir "$1")/mysqld.sock" -uroot ping >/dev/null 2>&1; }
sql_root() { mariadb --no-defaults --socket="$(node_dir "$1")/mysqld.sock" -uroot -N -B "${@:2}"; }

cluster_url() {
    local hosts=()
    for n in "${nodes[@]}"; do hosts+=("127.0.0.1:$(sqlport "$n")"); done
    (IFS=,; echo "mysql://$user:$password@${hosts[*]}/$database")
}

# The server options of node N in the cluster (under DIR) or of the template's bootstrap.
server() {
    local n=$1 d=$2 gcomm=$3 g=$4 sql=$5; shift 5
    mariadbd --no-defaults --user=mysql --datadir="$d/data" --tmpdir="$d/tmp" --socket="$d/mysqld.sock" \
        --port="$sql" --bind-address=127.0.0.1 --pid-file="$d/mariadbd.pid" --log-error="$d/error.log" \
        --skip-name-resolve --server-id="$n" --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-flush-log-at-trx-commit=1 --binlog-format=ROW --innodb-autoinc-lock-mode=2 \
        --wsrep-on=ON --wsrep-provider="$provider" --wsrep-cluster-name=saga-test \
        --wsrep-cluster-address="gcomm://$gcomm" --wsrep-node-address=127.0.0.1 --wsrep-node-name="node$n" \
        --wsrep-node-incoming-address="127.0.0.1:$sql" \
        --wsrep-sst-method=rsync --wsrep-sst-receive-address="127.0.0.1:$(( g + 20 ))" \
        --wsrep-provider-options="gmcast.listen_addr=tcp://127.0.0.1:$g;ist.recv_addr=127.0.0.1:$(( g + 10 ));gcache.size=32M;evs.keepalive_period=PT0.5S;evs.suspect_timeout=${SAGA_GALERA_SUSPECT_TIMEOUT:-PT2S};evs.inactive_timeout=${SAGA_GALERA_INACTIVE_TIMEOUT:-PT4S};evs.install_timeout=PT3S;evs.join_retrans_period=PT0.5S;pc.announce_timeout=PT1S" \
        "$@" >/dev/null 2>&1 &
}

# Waits until node N's server answers and it is synced with the cluster (wsrep_ready ON).
wait_synced() {
    local n=$1
    for _ in $(seq 1 600); do
        if ping_node "$n"; then
            local state
            state=$(sql_root "$n" -e "SHOW STATUS LIKE 'wsrep_local_state_comment'" 2>/dev/null | cut -f2 || true)
            [ "$state" = Synced ] && return 0
        fi
        [ -f "$(pidfile "$n")" ] && ! kill -0 "$(cat "$(pidfile "$n")")" 2>/dev/null && break
        sleep 0.1
    done
    echo "node $n did not join the cluster; its log:" >&2
    tail -30 "$(node_dir "$n")/error.log" >&2
    return 1
}

# The template: installed, bootstrapped once as a one-node cluster (so its grastate.dat holds a
# cluster id and position), the user and database created, cleanly shut down.
make_template() {
    [ -f "$template/ready" ] && return 0
    mkdir -p "$(dirname "$template")"
    exec 9>"$template.lock"
    flock 9
    [ -f "$template/ready" ] && return 0
    local t
    t=$(mktemp -d "$template.build-XXXXXX")
    trap 'rm -rf "$t"' EXIT
    chmod 755 "$t"
    mkdir -p "$t/tmp"
    chown -R mysql: "$t"
    mariadb-install-db --no-defaults --datadir="$t/data" --tmpdir="$t/tmp" --user=mysql \
        --auth-root-authentication-method=normal --skip-test-db >"$t/install.log" 2>&1 \
        || { cat "$t/install.log" >&2; exit 1; }
    chown -R mysql: "$t"
    local g=$(( 20000 + RANDOM % 11000 ))
    server 0 "$t" "" "$g" "$(( g + 40 ))" --wsrep-new-cluster
    for _ in $(seq 1 600); do
        mariadb-admin --no-defaults --socket="$t/mysqld.sock" -uroot ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    mariadb --no-defaults --socket="$t/mysqld.sock" -uroot <<SQL || { tail -30 "$t/error.log" >&2; exit 1; }
CREATE DATABASE IF NOT EXISTS $database;
CREATE USER IF NOT EXISTS '$user'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER IF NOT EXISTS '$user'@'localhost' IDENTIFIED BY '$password';
GRANT ALL PRIVILEGES ON *.* TO '$user'@'127.0.0.1' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO '$user'@'localhost' WITH GRANT OPTION;
SQL
    local pid
    pid=$(cat "$t/mariadbd.pid")
    kill -TERM "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    grep -q "^seqno: *[0-9]" "$t/data/grastate.dat" || { echo "the template was not shut down cleanly" >&2; cat "$t/data/grastate.dat" >&2; exit 1; }
    rm -rf "$t/tmp"/* "$t/mysqld.sock" "$t/error.log"
    touch "$t/ready"
    rm -rf "$template"
    mv "$t" "$template"
    trap - EXIT
}

start_node() {
    local n=$1; shift
    local d
    d=$(node_dir "$n")
    if ping_node "$n"; then return 0; fi
    local gcomm=""
    for m in "${nodes[@]}"; do gcomm+="${gcomm:+,}127.0.0.1:$(gport "$m")"; done
    rm -f "$d/mariadbd.pid"
    mkdir -p "$d/tmp"
    chown -R mysql: "$d"
    server "$n" "$d" "$gcomm" "$(gport "$n")" "$(sqlport "$n")" "$@"
    wait_synced "$n"
}

stop_node() {
    local n=$1 signal=${2:-TERM}
    local p
    p=$(pidfile "$n")
    [ -f "$p" ] || return 0
    local pid
    pid=$(cat "$p")
    kill -CONT "$pid" 2>/dev/null || true  # a paused node cannot stop
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    rm -f "$p"
}

case "$cmd" in
start)
    need
    if [ -f "$dir/baseport" ] && ping_node 1 && ping_node 2 && ping_node 3; then
        echo "a cluster is already running in $dir" >&2
        cluster_url
        exit 0
    fi
    make_template
    mkdir -p "$dir"
    chmod 755 "$dir"
    [ -f "$dir/baseport" ] || echo "${3:-$(( 20000 + (RANDOM % 1100) * 10 ))}" >"$dir/baseport"
    fresh=0
    for n in "${nodes[@]}"; do
        if [ ! -d "$(node_dir "$n")/data" ]; then
            fresh=1
            mkdir -p "$(node_dir "$n")"
            cp -a "$template/data" "$(node_dir "$n")/data"
        fi
    done
    if [ "$fresh" = 1 ]; then
        start_node 1 --wsrep-new-cluster
    else
        # An existing cluster stopped whole: bootstrap from the node that stopped last.
        sed -i 's/^safe_to_bootstrap: 0/safe_to_bootstrap: 1/' "$(node_dir 1)/data/grastate.dat"
        start_node 1 --wsrep-new-cluster
    fi
    start_node 2
    start_node 3
    cluster_url
    ;;
stop)
    [ -f "$dir/baseport" ] || exit 0
    for n in 3 2 1; do stop_node "$n"; done
    ;;
kill) stop_node "${3:?node number}" KILL ;;
start-node) need; start_node "${3:?node number}" ;;
stop-node) stop_node "${3:?node number}" ;;
url)
    if [ -n "${3:-}" ]; then echo "mysql://$user:$password@127.0.0.1:$(sqlport "$3")/$database"; else cluster_url; fi
    ;;
status)
    sql_root "${3:?node number}" -e "SHOW STATUS WHERE Variable_name IN ('wsrep_cluster_size','wsrep_local_state_comment','wsrep_ready')"
    ;;
*) echo "$usage" >&2; exit 2 ;;
esac
