"""A separate process that uses a CubeStore, for the store's crash and concurrency tests.

Usage::

    store_writer.py ROOT pause POINT CUBE_ID SIZE SEED   put one cube, stop at POINT, print "PAUSED", sleep
    store_writer.py ROOT loop PREFIX COUNT SIZE SEED     put COUNT cubes PREFIX-i, print "PUT i T" after each
    store_writer.py ROOT read CUBE_ID SECONDS            get + list in a loop, print "READS n" at the end

POINT is where the test will SIGKILL the process:
  mid_write      half of the payload is in the temp file
  before_rename  the temp file is complete and fsynced, not yet moved into objects/
  before_commit  the payload is in objects/, the index row is inserted but not committed
  after_commit   the put is complete

The pause points are reached by wrapping library functions in this process only, so the store's own
code carries no test hooks. Payloads are ``random.Random(SEED).randbytes(SIZE)``: the same seed gives
the same digest in every process (used to make two writers share a payload).

With ``MEMFED_TEST_START_AT`` (a ``time.time()`` value) in the environment, the work starts at that
moment, so processes started one after another really run at once.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from memfed.cube import new_manifest, payload_digest
from memfed.node import store_files
from memfed.node.store import CubeStore
from memfed.node.store_index import StoreIndex


def make_cube(cube_id: str, version: str, size: int, seed: int):  # type: ignore[no-untyped-def]
    payload = random.Random(seed).randbytes(size)
    manifest = new_manifest(
        cube_id=cube_id,
        version=version,
        kind="plaintext",
        digest=payload_digest(payload),
        size_bytes=len(payload),
    )
    return manifest, payload


def pause(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    while True:
        time.sleep(60)


def install_pause(point: str) -> None:
    if point == "mid_write":
        original_write_all = store_files.write_all

        def write_half_then_pause(fd: int, data: memoryview) -> None:
            original_write_all(fd, data[: len(data) // 2])
            pause(point)

        store_files.write_all = write_half_then_pause
    elif point == "before_rename":
        original_rename = os.rename

        def rename_pause(src, dst):  # type: ignore[no-untyped-def]
            if str(src).endswith(store_files.TEMP_SUFFIX):
                pause(point)
            return original_rename(src, dst)

        os.rename = rename_pause
    elif point == "before_commit":
        StoreIndex.commit = lambda self: pause(point)  # type: ignore[method-assign]
    elif point != "after_commit":
        raise SystemExit(f"unknown pause point {point}")


def main() -> None:
    root, mode, *args = sys.argv[1:]
    store = CubeStore(Path(root))
    start_at = float(os.environ.get("MEMFED_TEST_START_AT", "0"))
    time.sleep(max(0.0, start_at - time.time()))
    if mode == "pause":
        point, cube_id, size, seed = args
        install_pause(point)
        manifest, payload = make_cube(cube_id, "1.0.0", int(size), int(seed))
        store.put(manifest, payload)
        pause(point)  # after_commit
    elif mode == "loop":
        prefix, count, size, seed = args
        for i in range(int(count)):
            manifest, payload = make_cube(f"{prefix}-{i}", "1.0.0", int(size), int(seed) + i)
            store.put(manifest, payload)
            print(f"PUT {i} {time.time():.6f}", flush=True)
    elif mode == "read":
        cube_id, seconds = args
        deadline = time.monotonic() + float(seconds)
        n = 0
        while time.monotonic() < deadline:
            cube = store.get(cube_id)
            assert payload_digest(cube.payload) == cube.manifest.digest
            store.list()
            n += 1
        print(f"READS {n}", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")
    store.close()


if __name__ == "__main__":
    main()
