"""Imports point one way: lint-imports checks the contracts in setup.cfg ([importlinter] sections).

The folders are installed under the `mtplm` namespace by setup.cfg's package_dir; an editable install maps them
with an import hook that import-linter cannot walk, so the test lays the same mapping out as symlinks and points
lint-imports at it.
"""

import configparser
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts(tmp_path):
    lint = shutil.which("lint-imports")
    assert lint, "lint-imports not found: install the test extra (pip install -e '.[test]')"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    namespace = tmp_path / "mtplm"
    namespace.mkdir()
    for line in setup["options"]["package_dir"].strip().splitlines():
        package, folder = (s.strip() for s in line.split("="))
        (namespace / package.removeprefix("mtplm.")).symlink_to(ROOT / folder, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([lint, "--no-cache", str(ROOT / "setup.cfg")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
