"""A longer crash-safety run than the test suite's 20 kill points per writer (issue 22).

    python scripts/kill_saves.py --points 200 --seed 1
    python scripts/kill_saves.py --points 50 --writers "gk.export" "gk.export litert" \
        --export-kills 5

Every writer (save_to_preset in both layouts, save_lora_weights, the command line's
finetune / convert / export, gk.export as SavedModel or LiteRT) is SIGKILLed at the given
number of seeded points of its write, as tests/crash_points.py describes, over a copy of the
bundled demo preset (4.2M parameters) unless --source names another checkpoint. Exports
record the targets at each of their events; --export-kills also kills that many exports for
real (~20 s each). Prints the outcomes per writer and every failure; exits 1 if there was one.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
WRITERS = ("save_to_preset[keras_hub]", "save_to_preset[hf]", "save_lora_weights",
           "cli finetune", "cli convert", "cli export", "gk.export", "gk.export litert")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100, help="kill points per writer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", nargs="+", default=list(WRITERS), choices=WRITERS)
    parser.add_argument("--export-kills", type=int, default=0)
    parser.add_argument("--source", default=str(REPO / "presets" / "gemma_demo"))
    parser.add_argument("--no-tmpfs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill_saves_") as work:
        out = pathlib.Path(work) / "results.json"
        command = [sys.executable, str(REPO / "tests" / "crash_points.py"), "--source",
                   args.source, "--workdir", str(pathlib.Path(work) / "w"), "--out", str(out),
                   "--points", str(args.points), "--seed", str(args.seed),
                   "--export-kills", str(args.export_kills), "--writers", *args.writers]
        if args.no_tmpfs:
            command.append("--no-tmpfs")
        # The fork server's own output (progress bars, h5py's notes on a full disk) is noise.
        server = subprocess.run(command, capture_output=True, text=True)
        if server.returncode != 0 or not out.exists():
            print(server.stdout[-3000:], server.stderr[-3000:], sep="\n")
            return 1
        results = json.loads(out.read_text())
    failures = []
    for name, result in results.items():
        if name in ("seconds", "full disk"):
            continue
        print(f"{name:28} {len(result['points']):4} points, {result.get('events', 0):3} events "
              f"in a write: {result['outcomes']}; hidden leftovers seen "
              f"{result['hidden_leftovers']}")
        failures += result["failures"]
    disk = results.get("full disk", {})
    for case in disk.get("cases", []):
        print(f"full disk ({case['kind']}) {case['writer']}: {case.get('error')}: "
              f"{case.get('message', '')[:160]}")
    if disk.get("skipped"):
        print(f"tmpfs: skipped ({disk['skipped']})")
    failures += disk.get("failures", [])
    print(f"seconds: {results['seconds']}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
