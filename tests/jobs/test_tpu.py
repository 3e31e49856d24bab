"""Installing the `[tpu]` extra leaves TensorFlow 2.21 and its protobuf as they are.

cloud-tpu-client 0.10 pins old Google API client versions. pip's resolver is
asked (a dry run, so the environment stays untouched) what installing
`kfac-dist[tpu]` into this environment would change: TensorFlow, Keras,
protobuf and NumPy must not be among the packages it would install.
"""

import json
import subprocess
import sys

from tests.paths import ROOT as ROOT_PATH

ROOT = ROOT_PATH
UNTOUCHABLE = {"tensorflow", "keras", "protobuf", "numpy", "tf-keras"}


def test_tpu_extra_resolves_without_touching_tensorflow_or_protobuf(tmp_path):
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "-e",
            f"{ROOT}[tpu]",
        ],
        check=True,
        timeout=600,
    )
    planned = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "cloud-tpu-client" in planned or _installed("cloud-tpu-client")
    assert not UNTOUCHABLE & set(planned), f"the [tpu] extra would change {planned}"


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True
