"""Runs ``pip check`` and fails on any line not matched by the allowed-exceptions file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def main(allowed_file: str) -> int:
    patterns = [
        re.compile(line.strip())
        for line in Path(allowed_file).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    unexpected = [
        line
        for line in lines
        if line != "No broken requirements found." and not any(p.search(line) for p in patterns)
    ]
    for line in lines:
        print(("  accepted: " if line not in unexpected else "  UNEXPECTED: ") + line)
    if unexpected:
        print(f"pip check: {len(unexpected)} unexpected problem(s); see {allowed_file}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
