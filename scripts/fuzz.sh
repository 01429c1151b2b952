#!/usr/bin/env bash
# Fuzzes the journal record decoder with libFuzzer (swiftc -sanitize=fuzzer,address).
#   scripts/fuzz.sh [SECONDS]   default 60; new interesting inputs land in Fuzz/corpus/journal
#   scripts/fuzz.sh --seeds     rewrites the seed records from the real encoder
# The corpus is committed; the tests replay every file in it (JournalCorpusTests).
set -euo pipefail
cd "$(dirname "$0")/.."
sources=(Sources/Saga/JournalRecord.swift Sources/Saga/CRC32C.swift Sources/Saga/SagaID.swift Sources/Saga/SQLSession.swift)
mkdir -p .build Fuzz/corpus/journal
if [ "${1:-}" = "--seeds" ]; then
    swiftc -D SEED_GENERATOR -parse-as-library "${sources[@]}" Fuzz/JournalDecoderFuzz.swift -o .build/journal-seeds
    .build/journal-seeds Fuzz/corpus/journal
    exit 0
fi
seconds=${1:-60}
swiftc -sanitize=fuzzer,address -parse-as-library -g "${sources[@]}" Fuzz/JournalDecoderFuzz.swift -o .build/journal-fuzzer
# Merge what it finds into the committed corpus, keeping only inputs that add coverage.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.build/journal-fuzzer -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 "$work" Fuzz/corpus/journal
.build/journal-fuzzer -merge=1 Fuzz/corpus/journal "$work" 2>&1 | tail -2
echo "corpus: $(ls Fuzz/corpus/journal | wc -l) inputs in Fuzz/corpus/journal"
