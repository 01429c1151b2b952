#!/usr/bin/env bash
# The whole test suite. Installs what is missing, builds warning-free, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
SAGA_WITH_SERVER=1 bash scripts/setup.sh

# Everything this run starts lives under one temporary directory of its own (TMPDIR for every
# program below), so that the cleanup finds it all: the throwaway MariaDB server for the MySQL
# tests and the 3-node Galera cluster for the cluster tests (temp datadirs, loopback ports, a
# real user and password), and every server or cluster a test or the torture starts and a
# crashed process could not stop. Stopped on exit, also when tests fail. The directory is
# world-readable: the cluster's servers run as the mysql user.
run_tmp=$(mktemp -d /tmp/saga-run-XXXXXX)
chmod 755 "$run_tmp"
export TMPDIR="$run_tmp"
server_dir="$run_tmp/mariadb-shared"
galera_dir="$run_tmp/galera-shared"
other_servers=()
cleanup() {
    for d in "$server_dir" "${other_servers[@]}"; do bash scripts/mariadb.sh stop "$d" || true; done
    for f in "$run_tmp"/*/baseport; do [ -f "$f" ] && { bash scripts/galera.sh stop "$(dirname "$f")" || true; }; done
    for f in "$run_tmp"/*/mariadbd.pid; do [ -f "$f" ] && { bash scripts/mariadb.sh stop "$(dirname "$f")" || true; }; done
    rm -rf "$run_tmp"
}
trap cleanup EXIT
SAGA_MYSQL_URL=$(bash scripts/mariadb.sh start "$server_dir" | tail -1)
export SAGA_MYSQL_URL
echo "==> MariaDB for the tests: ${SAGA_MYSQL_URL/:saga-test-pw@/:***@}"
SAGA_GALERA_URL=$(bash scripts/galera.sh start "$galera_dir" | tail -1)
export SAGA_GALERA_URL
echo "==> a 3-node MariaDB Galera cluster for the tests: ${SAGA_GALERA_URL/:saga-test-pw@/:***@}"

echo "==> swift build (warnings are errors here)"
log=$(mktemp)
trap 'rm -f "$log"; cleanup' EXIT
swift build --build-tests 2>&1 | tee "$log" | grep -E "error|warning:|Compiling|Build complete" | grep -v "^\[.*Compiling" || true
if grep -E "^/.*(warning|error):" "$log" >/dev/null; then
    echo "build produced warnings or errors:" >&2
    grep -E "^/.*(warning|error):" "$log" >&2
    exit 1
fi
grep -q "Build complete" "$log" || { echo "build failed" >&2; tail -30 "$log" >&2; exit 1; }

echo "==> the getting-started example"
# The README's Use code, run: it checks its own results and exits non-zero if one is wrong. On
# SQLite, then on the test server's MariaDB (it drops its table there when done).
env -u SAGA_MYSQL_URL .build/debug/getting-started
.build/debug/getting-started

echo "==> DocC (warnings are errors)"
# The Saga module's documentation and its catalog, Sources/Saga/Saga.docc: a broken symbol or
# article link, or a parameter list that does not match its declaration, fails the run. The
# archive goes to .build/plugins/Swift-DocC/outputs/Saga.doccarchive, the plugin's own work
# directory: neither --disable-sandbox nor --allow-writing-to-directory is needed.
# SwiftPM's notice about a dependency's own stray files (swift-distributed-tracing 1.7.3 ships a
# CMakeLists.txt in each target) is not ours to fix and says nothing about the docs: not counted.
dependency_notice="^warning: '[^']+': found [0-9]+ file\(s\) which are unhandled"
if ! swift package generate-documentation --target Saga --warnings-as-errors --disable-indexing >"$log" 2>&1 \
    || grep -E "warning:" "$log" | grep -vE "$dependency_notice" >/dev/null; then
    echo "the documentation has warnings or errors:" >&2
    grep -v "^\[" "$log" >&2
    exit 1
fi
grep -E "^Finished building documentation" "$log"

echo "==> swift test"
# The library's own log lines (expected warnings from injected failures) are left out.
timeout 1800 swift test --skip-build 2>&1 | grep -v "^[0-9-]*T[0-9:+]* \(notice\|warning\|info\|error\) "

# The backend sets autocommit and the isolation level itself: the MariaDB suites pass the same
# on servers whose defaults say otherwise.
mariadb_suites='SagaTests\.(MySQL[A-Za-z]*Tests|ManyCoordinatorsTests|TransactionBoundaryTests|TrustII[A-Za-z]*Tests)/'
for option in --autocommit=0 --transaction-isolation=SERIALIZABLE; do
    dir=$(mktemp -d "$run_tmp/mariadb-XXXXXX")
    other_servers+=("$dir")
    url=$(MARIADBD_EXTRA="$option" bash scripts/mariadb.sh start "$dir" | tail -1)
    echo "==> the MariaDB suites again on a server started with $option"
    SAGA_MYSQL_URL="$url" timeout 1800 swift test --skip-build --filter "$mariadb_suites" 2>&1 | grep -v "^[0-9-]*T[0-9:+]* \(notice\|warning\|info\|error\) "
    bash scripts/mariadb.sh stop "$dir"
done

echo "==> saga-torture --short (crash points, random kills, I/O errors, power loss of SQLite and of RocksDB, server kills, replicas; SQLite and MariaDB in both coordinator modes, and a Galera cluster)"
# It starts and stops its own MariaDB server and Galera cluster: it kills them on purpose.
timeout 2700 .build/debug/saga-torture --short --json .build/saga-torture.json

echo "==> the test suite again under ThreadSanitizer"
bash scripts/tsan.sh

echo "==> the test suite again under AddressSanitizer"
bash scripts/asan.sh
