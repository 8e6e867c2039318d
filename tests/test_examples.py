"""The example scripts run as a new user would run them."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_own_training_loop_adapts_and_exports(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "own_training_loop.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    match = re.search(r"test accuracy of the derived network: ([\d.]+)%", result.stdout)

    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^e\d+ in ", result.stdout, flags=re.MULTILINE)) == 18
    assert match is not None
    assert float(match.group(1)) > 50.0
    assert (tmp_path / "derived-digits.ts").is_file()
