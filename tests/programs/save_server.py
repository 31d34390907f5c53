"""A console-driven test server that saves like Minecraft: save-off, save-all flush, save-on.

While saving is on, a writer thread rewrites region-like files (`WORLD/region/r.N.mca`)
without pause, each in two halves with a gap between them, so a copy taken at the wrong
moment holds a half-written file. Every file is a run of 8-byte blocks holding one
generation number: a file whose blocks disagree was copied half-written (`torn()`).

Console:
  save-off         -> stop writing after the current file; "Automatic saving is now disabled"
  save-all flush   -> write every file once more, then "Saved the game" (after --save-delay)
  save-on          -> writing resumes; "Automatic saving is now enabled"
  stop             -> "Stopping the server", exit 0
At start, `--fail-if NAME` exits 3 when WORLD/NAME exists (a world that does not boot).
"""

import argparse
import os
import sys
import threading
import time

BLOCK = 8


def write_file(path: str, generation: int, size: int, gap: float) -> None:
    data = generation.to_bytes(BLOCK, "little") * (size // BLOCK)
    half = len(data) // 2
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data[:half], 0)
        time.sleep(gap)  # the moment a copy would tear the file
        os.pwrite(fd, data[half:], half)
    finally:
        os.close(fd)


def torn(data: bytes) -> bool:
    """True when the blocks of a region file do not all hold the same generation."""
    first = data[:BLOCK]
    return len(data) % BLOCK != 0 or data != first * (len(data) // BLOCK)


class World:
    def __init__(self, folder: str, files: int, size: int, gap: float) -> None:
        self.region = os.path.join(folder, "region")
        os.makedirs(self.region, exist_ok=True)
        self.paths = [os.path.join(self.region, f"r.{i}.mca") for i in range(files)]
        self.size, self.gap = size, gap
        self.generation = 0
        self.saving = True
        self.lock = threading.Lock()
        for path in self.paths:
            if not os.path.exists(path):
                write_file(path, 0, size, 0)

    def writer(self) -> None:
        index = 0
        while self.paths:
            with self.lock:
                if self.saving:
                    self.generation += 1
                    write_file(self.paths[index % len(self.paths)], self.generation,
                               self.size, self.gap)
                    index += 1
            time.sleep(0.001)  # lets the console thread take the lock

    def flush(self) -> None:
        with self.lock:
            self.generation += 1
            for path in self.paths:
                write_file(path, self.generation, self.size, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", default="world")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--size", type=int, default=256 * 1024)
    parser.add_argument("--gap", type=float, default=0.002)
    parser.add_argument("--save-delay", type=float, default=0.0)
    parser.add_argument("--fail-if", default=None)
    args = parser.parse_args()

    if args.fail_if and os.path.exists(os.path.join(args.world, args.fail_if)):
        print(f"world holds {args.fail_if}: refusing to start", flush=True)
        sys.exit(3)
    world = World(args.world, args.files, args.size, args.gap)
    threading.Thread(target=world.writer, daemon=True).start()
    print("Done (0.1s)! For help, type \"help\"", flush=True)
    for raw in sys.stdin:
        command = raw.strip()
        if command == "save-off":
            with world.lock:
                world.saving = False
            print("Automatic saving is now disabled", flush=True)
        elif command == "save-all flush":
            print("Saving the game (this may take a moment!)", flush=True)
            world.flush()
            time.sleep(args.save_delay)
            print("Saved the game", flush=True)
        elif command == "save-on":
            with world.lock:
                world.saving = True
            print("Automatic saving is now enabled", flush=True)
        elif command == "stop":
            print("Stopping the server", flush=True)
            sys.exit(0)
    time.sleep(3600)


if __name__ == "__main__":
    main()
