#!/usr/bin/env python3
"""Adds up meson's test logs of several build folders into one closing line:
'N passed, N failed, N skipped'. Exit status 1 when anything failed.
Arguments ending in .xml are pytest JUnit reports (a missing one is a
failure); NAME=ok / NAME=failed count one check each."""
import json
import os
import sys
import xml.etree.ElementTree as ET

passed = failed = skipped = 0
for folder in sys.argv[1:]:
    if "=" in folder:
        name, result = folder.split("=", 1)
        passed += result == "ok"
        failed += result != "ok"
        if result != "ok":
            print(f"failed: {name}")
        continue
    if folder.endswith(".xml"):
        if not os.path.exists(folder):
            failed += 1
            print(f"failed: {folder} was not written")
            continue
        for case in ET.parse(folder).iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
                print(f"failed: {name}")
            elif case.find("skipped") is not None:
                skipped += 1
                print(f"skipped: {name}")
            else:
                passed += 1
        continue
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
