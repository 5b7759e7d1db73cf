import subprocess
import sys
import zipfile

import pytest

from unitrain.data import PACKAGED

BACKEND_MODULES = ["numpy", "torch", "mindspore", "chainer"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(root)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    # setuptools takes folders with an identifier's name for packages: the data folders are declared as such
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr
    (path,) = out.glob("unitrain-*.whl")
    return path


def test_wheel_contains_every_backend_the_suite_and_the_datasets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in BACKEND_MODULES:
        assert f"unitrain/backends/{module}.py" in names
    assert "unitrain/conformance/__init__.py" in names
    for name, dataset in PACKAGED.items():  # mnist, fashion-mnist: their IDX files and provenance
        assert {f"unitrain/datafiles/{name}/{stem}.gz" for stem in dataset.sha256} <= names
        assert f"unitrain/datafiles/{name}/README.md" in names
    assert {"unitrain/datafiles/tz-news/NEWS.gz", "unitrain/datafiles/tz-news/README.md"} <= names  # the text
    assert not any(name.startswith(("tests/", "backends/", "conformance/")) for name in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    for extra in ("torch", "mindspore", "chainer", "distributed", "tensorboard", "all", "test", "docs"):
        assert f"Provides-Extra: {extra}" in text
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "unitrain = unitrain.__main__:main" in entry_points


def test_installed_wheel_trains_offline_from_its_own_data(wheel, tmp_path):
    """Installed into a bare target (no source tree on the path), the wheel finds its MNIST copy."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)  # fmt: skip
    code = (
        "import unitrain, unitrain.backends.numpy as b; d = unitrain.load_mnist('test');"
        "f = unitrain.load_dataset('fashion-mnist', 'test'); assert len(f) == len(d);"
        "print(len(d), unitrain.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.startswith("10000 ") and str(target) in out
