"""Gives the native sources whose content is unchanged since the last build in a build folder the mtimes they had then.

    python3 build/keep_mtimes.py <repository root> <build folder>

The device tool brings a fresh copy of the working tree to every call, every file newer than the objects a warm
machine kept from the call before: CMake would rebuild every kernel (about 200 s of the call). A file whose content
(SHA-1) equals what the last build in that folder saw gets that build's mtime back, older than its objects; a changed
file keeps its new mtime and is rebuilt, with everything that depends on it. The record (<build folder>/source-mtimes.json)
is rewritten each time with the mtimes the build is about to see, so a failed build leaves make's own logic intact.
A fresh build folder (CI, a cold machine) has no record: nothing is touched.
"""
import hashlib
import json
import os
import sys


def sources(root):
    yield os.path.join(root, "CMakeLists.txt")
    for top in ("FlashAttn.Native",):
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                yield os.path.join(folder, name)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def main(root, build):
    record_path = os.path.join(build, "source-mtimes.json")
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    kept, now = 0, {}
    for path in sources(root):
        rel = os.path.relpath(path, root)
        sha = digest(path)
        old = record.get(rel)
        if old is not None and old[0] == sha and os.stat(path).st_mtime_ns != old[1]:
            os.utime(path, ns=(old[1], old[1]))
            kept += 1
        now[rel] = [sha, os.stat(path).st_mtime_ns]
    os.makedirs(build, exist_ok=True)
    with open(record_path, "w") as f:
        json.dump(now, f)
    if record:
        changed = sum(1 for rel, (sha, _) in now.items() if record.get(rel, [None])[0] != sha)
        print(f"keep_mtimes: {kept} unchanged sources given their last build's mtimes, {changed} new or changed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
