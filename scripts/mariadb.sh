#!/usr/bin/env bash
# A throwaway MariaDB server as root, no systemd: temp datadir, loopback port and a Unix socket,
# a real user with a password.
#   scripts/mariadb.sh start DIR [PORT]   prints the mysql:// URL on its last line
#   scripts/mariadb.sh stop DIR           SIGTERM, then waits until the process is gone
# Restarting on an existing DIR keeps its data. MARIADBD_EXTRA adds server options.
# Each server has its own temporary directory, DIR/tmp, for mariadb-install-db and mariadbd:
# in the shared system one, two installs running at once on one machine were seen to clash
# ("Unknown table 'mysql.tmp_proxies_priv'": the bootstrap's temporary tables are plain files
# named after the process id there).
set -euo pipefail
cmd=${1:?usage: mariadb.sh start|stop DIR [PORT]}
dir=${2:?usage: mariadb.sh start|stop DIR [PORT]}
user=saga
password=saga-test-pw
database=saga

stop() {
    [ -f "$dir/mariadbd.pid" ] || return 0
    pid=$(cat "$dir/mariadbd.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/mariadbd.pid"
}

case "$cmd" in
start)
    # A killed server can linger as a zombie, so ask the server itself, not kill -0.
    if [ -S "$dir/mysqld.sock" ] && mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -uroot ping >/dev/null 2>&1; then
        echo "a server is already running in $dir" >&2
        echo "mysql://$user:$password@127.0.0.1:$(cat "$dir/port")/$database"
        exit 0
    fi
    port=${3:-$(( 20000 + RANDOM % 12000 ))}  # below the ephemeral range
    command -v mariadbd >/dev/null || { echo "mariadbd not found: install mariadb-server (scripts/setup.sh does)" >&2; exit 1; }
    mkdir -p "$dir" "$dir/tmp"
    echo "$port" >"$dir/port"
    if [ ! -d "$dir/data/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$dir/data" --tmpdir="$dir/tmp" --user=root \
            --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1 \
            || { cat "$dir/install.log" >&2; exit 1; }
    fi
    # MARIADBD_PRELOAD: a library for the server alone (saga-bench's fsync delay), not for the
    # clients this script runs.
    LD_PRELOAD="${MARIADBD_PRELOAD:-}" mariadbd --no-defaults --datadir="$dir/data" --tmpdir="$dir/tmp" --socket="$dir/mysqld.sock" --port="$port" \
        --bind-address=127.0.0.1 --user=root --pid-file="$dir/mariadbd.pid" \
        --log-error="$dir/error.log" --skip-name-resolve --innodb-flush-log-at-trx-commit=1 \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M ${MARIADBD_EXTRA:-} >/dev/null 2>&1 &
    for _ in $(seq 1 300); do
        mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -uroot ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -uroot ping >/dev/null 2>&1 \
        || { echo "MariaDB did not start; its log:" >&2; tail -20 "$dir/error.log" >&2; exit 1; }
    mariadb --no-defaults --socket="$dir/mysqld.sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS $database;
CREATE USER IF NOT EXISTS '$user'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER IF NOT EXISTS '$user'@'localhost' IDENTIFIED BY '$password';
GRANT ALL PRIVILEGES ON *.* TO '$user'@'127.0.0.1' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO '$user'@'localhost' WITH GRANT OPTION;
SQL
    echo "mysql://$user:$password@127.0.0.1:$port/$database"
    ;;
stop) stop ;;
*) echo "usage: mariadb.sh start|stop DIR [PORT]" >&2; exit 2 ;;
esac
