# expect: tasks succeeded
"""`keevx batch` on a small CSV against the built-in emulator: no key, no network.

The same command with KEEVX_API_KEY set and without --fake runs against the service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as directory:
    folder = Path(directory)
    prompts = folder / "prompts.csv"
    prompts.write_text(
        "custom_id,prompt,generate_count,image_ratio\n"
        "fox,a red fox in fresh snow,2,1:1\n"
        "tram,an old tram in Lisbon,1,16:9\n"
    )
    command = [sys.executable, "-m", "keevx_async", "batch", str(prompts), "--fake"]
    command += ["--out", str(folder / "results.jsonl"), "--download", str(folder / "images")]
    run = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    print(run.stdout)
    for line in (folder / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        print(record["line"], record["custom_id"], record["status"], Path(record["path"]).name)
    print("exit code", run.returncode)
