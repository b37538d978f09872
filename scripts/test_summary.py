#!/usr/bin/env python3
"""Adds up meson's test logs of several build folders into one closing line:
'N passed, N failed, N skipped'. Exit status 1 when anything failed."""
import json
import sys

passed = failed = skipped = 0
for folder in sys.argv[1:]:
    with open(f"{folder}/meson-logs/testlog.json", encoding="utf-8") as log:
        for line in log:
            entry = json.loads(line)
            result = entry.get("result", "")
            if result in ("OK", "EXPECTEDFAIL"):
                passed += 1
            elif result == "SKIP":
                skipped += 1
                print(f"skipped: {folder}: {entry.get('name')}")
            else:
                failed += 1
                print(f"failed: {folder}: {entry.get('name')} ({result})")
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
