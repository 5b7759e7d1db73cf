"""Hostile input files, read side: each case is crafted in tmp_path and must end in one clear
error (through the CLI: one line on stderr, exit 2), in bounded memory, with every input file
byte-identical afterwards. A representative subset runs through `unitrain` in a subprocess, the
rest through the Python API."""

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import unitrain
from unitrain.checkpoint import MANIFEST, RANDOM, CheckpointError, load_checkpoint, save_checkpoint
from unitrain.data import DataError, load_mnist, packaged_mnist_dir
from unitrain.datasets import NPZ_KEYS
from unitrain.files import LOCK_FILE
from unitrain.layers import MODEL_PATTERN
from unitrain.randomness import STREAM_KEY
from unitrain.weights import WeightsError, check_state, load_safetensors, save_safetensors

RUN = {"model": "mlp", "dataset": "mnist", "optimizer": "sgd", "batch_size": 64, "epochs": 3, "max_steps": None,
       "shuffle": True}  # fmt: skip
MAX_RSS_MB = 700  # the memory any input file may cost, whatever its size
# Prelude of the measuring subprocesses: the peak RSS of the process's own memory (VmHWM). Not
# getrusage's ru_maxrss, which Linux carries over exec from the forking parent (a test process that
# has loaded every framework reports its own gigabytes there).
PEAK_RSS = (
    "def peak_rss_mb():\n"
    "    with open('/proc/self/status') as status:\n"
    "        return next(int(line.split()[1]) // 1024 for line in status if line.startswith('VmHWM:'))\n"
)


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "unitrain", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, **kwargs)  # fmt: skip


def regular_files(root: Path) -> dict:
    """Content digests of the regular files under ``root`` (size and mtime for huge sparse ones)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            found[path] = (
                (info.st_size, info.st_mtime_ns)
                if info.st_size > 1 << 26
                else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return found


def assert_refused(root: Path, args, message: str):
    """One line, exit 2, and every file under ``root`` as it was (a checkpoint directory's lock file,
    which holds no data and stays by design, may appear)."""
    before = regular_files(root)
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("unitrain: error: "), result.stderr
    assert {path: digest for path, digest in regular_files(root).items() if path.name != LOCK_FILE} == before


def header_file(path: Path, header: str, body: bytes = b"") -> Path:
    encoded = header.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "good.safetensors"
    save_safetensors(path, unitrain.make_loop("numpy", unitrain.mlp(), seed=0).state_dict())
    return path


# --- weights files ------------------------------------------------------------------------------

ENTRY = '"a":{{"dtype":"F32","shape":{shape},"data_offsets":{offsets}}}'
MALFORMED_HEADERS = [
    ("Infinity in shape", "{" + ENTRY.format(shape="[Infinity]", offsets="[0,4]") + "}", "invalid JSON"),
    ("Infinity in data_offsets", "{" + ENTRY.format(shape="[1]", offsets="[0,Infinity]") + "}", "invalid JSON"),
    ("dimension above 2^63", "{" + ENTRY.format(shape=f"[{2**63 + 5},0]", offsets="[0,0]") + "}", "beyond NumPy"),
    ("33 dimensions", "{" + ENTRY.format(shape="[" + ",".join(["1"] * 33) + "]", offsets="[0,4]") + "}",
     "beyond NumPy"),
    ("200k-deep nesting", '{"a":' + "[" * 200_000 + "]" * 200_000 + "}", "recursion limit"),
    ("5,000-digit integer", "{" + ENTRY.format(shape="[" + "1" * 5000 + "]", offsets="[0,4]") + "}",
     "number out of range"),
    ("shape [10.7]", "{" + ENTRY.format(shape="[10.7]", offsets="[0,40]") + "}", "floating point `10.7`"),
    ('"91" as shape', "{" + ENTRY.format(shape='"91"', offsets="[0,364]") + "}", 'string "91", expected a sequence'),
    ("duplicate keys", "{" + ENTRY.format(shape="[1]", offsets="[0,4]") + "," + ENTRY.format(shape="[1]",
     offsets="[0,4]") + "}", "key 'a' appears more than once"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("header", "message"), [c[1:] for c in MALFORMED_HEADERS], ids=[c[0] for c in MALFORMED_HEADERS]
)
def test_malformed_safetensors_headers_are_refused(tmp_path, header, message):
    # a body as long as the (first) entry says, so that only what the case is about is wrong
    end = re.search(r'"data_offsets":\[0,(\d+)\]', header)
    path = header_file(tmp_path / "w.safetensors", header, bytes(int(end.group(1)) if end else 4))
    with pytest.raises(WeightsError, match="is not a valid safetensors file") as error:
        load_safetensors(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_huge_headers_are_refused_in_bounded_memory(tmp_path):
    """The library's own limit (100 MB) lets its parser take 1.2 GB; unitrain's is 16 MiB."""
    entry = b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    for name, size in (("over", 17 << 20), ("under", 16 << 20)):
        header = b"{" + entry * (size // len(entry) - 1) + entry[:-1] + b"}"
        (tmp_path / name).write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    code = (PEAK_RSS + "import sys\nfrom unitrain.weights import WeightsError, load_safetensors\n"
            "for path in sys.argv[1:]:\n    try:\n        load_safetensors(path)\n"
            "    except WeightsError as error:\n        print(error)\n"
            "print(peak_rss_mb())")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, tmp_path / "over", tmp_path / "under"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    over, under, rss_mb = result.stdout.splitlines()
    assert "is over unitrain's limit of 16777216 bytes" in over
    assert "key 'a' appears more than once" in under
    assert int(rss_mb) < MAX_RSS_MB


def test_an_integer_weights_file_is_refused_naming_key_and_dtype(tmp_path, weights):
    state, _ = load_safetensors(weights)
    save_safetensors(tmp_path / "i32.safetensors", {**state, "1.weight": state["1.weight"].astype(np.int32)})
    assert_refused(tmp_path, ["evaluate", "--weights", tmp_path / "i32.safetensors"],
                   "key '1.weight' has dtype I32, expected a floating dtype (F16, F32, F64)")  # fmt: skip


def test_batchnorm_counters_stay_int64_and_a_float_counter_is_refused():
    model = unitrain.Sequential(unitrain.Linear(4, 3), unitrain.BatchNorm1d(3))
    state = unitrain.init_weights(model, 0)
    check_state(model.state_shapes(), state)
    with pytest.raises(WeightsError, match="'1.num_batches_tracked' has dtype F32, expected an integer dtype"):
        check_state(model.state_shapes(), {**state, "1.num_batches_tracked": np.zeros((), np.float32)})


def test_nan_weights_and_unreadable_dtypes_are_refused(tmp_path):
    save_safetensors(tmp_path / "nan.safetensors", {"a": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(WeightsError, match="tensor 'a' contains NaN or infinite values"):
        load_safetensors(tmp_path / "nan.safetensors")
    header_file(tmp_path / "bf16.safetensors", '{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}', bytes(2))
    with pytest.raises(WeightsError, match="dtype BF16 is beyond NumPy"):
        load_safetensors(tmp_path / "bf16.safetensors")


def test_the_header_is_checked_before_any_tensor_is_read(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": np.zeros(3, np.float32)})
    seen = {}

    def refuse(declared):
        seen.update(declared)
        raise WeightsError("refused from the header")

    with pytest.raises(WeightsError, match="refused from the header"):
        load_safetensors(path, refuse)
    assert seen == {"a": ((3,), "F32")}


def test_a_long_list_of_unexpected_keys_is_shortened(tmp_path, weights):
    state, _ = load_safetensors(weights)
    extra = {"k" * 100_000: np.zeros(1, np.float32), **{f"extra.{i}": np.zeros(1, np.float32) for i in range(1000)}}
    save_safetensors(tmp_path / "many.safetensors", {**state, **extra})
    shapes = unitrain.mlp().state_shapes()
    with pytest.raises(WeightsError, match="and 996 more") as error:
        load_safetensors(tmp_path / "many.safetensors", lambda declared: check_state(shapes, declared))
    assert len(str(error.value)) < 300


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: os.mkfifo(d / "w") or d / "w", "is a FIFO, expected a safetensors file"),
        (lambda d: Path("/dev/zero"), "is a character device, expected a safetensors file"),
        (lambda d: Path("/dev/stdin"), "is a character device, expected a safetensors file"),  # stdin is /dev/null
        (lambda d: os.symlink("b", d / "a") or os.symlink("a", d / "b") or d / "a", "is a symlink loop"),
        (lambda d: os.symlink("gone", d / "w") or d / "w", "is a broken symlink"),
        (lambda d: d, "is a directory, expected a safetensors file"),
    ],
    ids=["FIFO", "/dev/zero", "/dev/stdin", "symlink loop", "broken symlink", "directory"],
)
def test_what_is_at_the_weights_path_is_named(tmp_path, make, message):
    assert_refused(tmp_path, ["evaluate", "--weights", make(tmp_path)], message)


def test_a_30_gb_sparse_weights_file_is_refused_in_bounded_memory(tmp_path, weights):
    zeros, tail = tmp_path / "zeros.safetensors", tmp_path / "tail.safetensors"
    subprocess.run(["truncate", "-s", "30G", zeros], check=True)
    shutil.copy(weights, tail)  # a valid header, then 30 GB the header does not cover
    subprocess.run(["truncate", "-s", "30G", tail], check=True)
    for path, message in ((zeros, "invalid JSON in header"), (tail, "file not fully covered")):
        code = (PEAK_RSS + "import sys; from unitrain.cli import main; status = main(sys.argv[1:]); "
                "print(status, peak_rss_mb())")  # fmt: skip
        result = subprocess.run([sys.executable, "-c", code, "evaluate", "--weights", str(path)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        status, rss_mb = map(int, result.stdout.split())
        assert status == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert rss_mb < MAX_RSS_MB


# --- dataset files ------------------------------------------------------------------------------


def deflated(header: bytes, zeros: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``header`` then ``zeros`` zero bytes, made in milliseconds: one
    compressed MiB of zeros repeated (each ends byte-aligned and refers to nothing before it,
    Z_FULL_FLUSH), and the CRC-32 of what it inflates to."""

    def block(data: bytes, end=zlib.Z_FULL_FLUSH) -> bytes:
        compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush(end)

    mib = bytes(1 << 20)
    whole, rest = divmod(zeros, len(mib))
    crc = zlib.crc32(header)
    for _ in range(whole):
        crc = zlib.crc32(mib, crc)
    stream = block(header) + block(mib) * whole + block(mib[:rest], zlib.Z_FINISH)
    return stream, zlib.crc32(mib[:rest], crc)


def write_zip(path: Path, members: dict[str, tuple[bytes, int, int]]) -> None:
    """A zip of deflated ``name: (stream, crc, size)`` members (zipfile would deflate them itself)."""
    with open(path, "wb") as file:
        central = b""
        for name, (stream, crc, size) in members.items():
            offset, encoded = file.tell(), name.encode()
            fields = (8, 0, 0x21, crc, len(stream), size, len(encoded))  # deflate, time, date, sizes, name length
            file.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, *fields, 0) + encoded + stream)
            central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, *fields, 0, 0, 0, 0, 0,
                                   offset) + encoded  # fmt: skip
        start = file.tell()
        count = len(members)
        file.write(central + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), start, 0))


def test_an_npz_of_deflated_zeros_is_refused_from_its_headers(tmp_path):
    """5 MB of .npz whose x_train and x_test declare 549 MB each, within the cap one by one: the
    total is refused before either is inflated (it was read, then normalised: gigabytes)."""
    samples = 700_000
    members = {}
    for key in NPZ_KEYS:
        header = io.BytesIO()
        shape = (samples, 28, 28) if key.startswith("x_") else (samples,)
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
        zeros = int(np.prod(shape))
        members[f"{key}.npy"] = (*deflated(header.getvalue(), zeros), len(header.getvalue()) + zeros)
    path = tmp_path / "bomb.npz"
    write_zip(path, members)
    assert path.stat().st_size < 8 << 20
    code = (
        PEAK_RSS
        + "import sys; from unitrain.cli import main; status = main(sys.argv[1:]); print(status, peak_rss_mb())"
    )
    result = subprocess.run([sys.executable, "-c", code, "train", "--dataset", str(path)], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    status, rss_mb = map(int, result.stdout.split())
    total = 2 * samples * (784 + 1)
    assert (
        result.stderr == f"unitrain: error: {path}: its arrays declare {total} bytes together; at most 1073741824 "
        "are read\n"
    )
    assert status == 2 and rss_mb < MAX_RSS_MB


def test_what_transforms_make_is_refused_from_the_npz_headers(tmp_path):
    images = np.zeros((50, 28, 28), np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=images, y_train=np.arange(50) % 10, x_test=images[:10], y_test=np.arange(10))
    result = cli("train", "--dataset", path, "--resize", "6000x6000")
    assert result.returncode == 2
    assert (
        result.stderr == "unitrain: error: data: resize 6000x6000 make 60 samples of 1x6000x6000, 8.0 GiB of "
        "float32; expected at most 4 GiB\n"
    )


# --- MNIST files ------------------------------------------------------------------------------


def test_a_gzip_bomb_is_never_inflated_beyond_the_header(tmp_path):
    """A t10k-labels file whose gzip stream inflates to 1 GiB: the reader stops one byte after
    the 10,008 bytes the header's dimensions need, in bounded memory."""
    deflate = zlib.compressobj(1, wbits=31)  # the fastest level: 4.5 MB of gzip
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as file:
        file.write(deflate.compress(struct.pack(">HBBI", 0, 8, 1, 10000)))
        zeros = bytes(1 << 20)
        for _ in range(1024):
            file.write(deflate.compress(zeros))
        file.write(deflate.flush())
    shutil.copy(packaged_mnist_dir() / "t10k-images-idx3-ubyte.gz", tmp_path)
    code = (PEAK_RSS + "import sys, unitrain\n"
            "try:\n    unitrain.load_mnist('test', sys.argv[1], verify=False)\n"
            "except unitrain.data.DataError as error:\n    print(error)\n"
            "print(peak_rss_mb())")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    message, rss_mb = result.stdout.splitlines()
    assert "has trailing bytes after the 10000 data bytes" in message
    assert int(rss_mb) < MAX_RSS_MB


def test_a_header_claiming_other_dimensions_is_refused_before_reading(tmp_path):
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as file:
        file.write(struct.pack(">HBBI", 0, 8, 1, 2**32 - 1))
    shutil.copy(packaged_mnist_dir() / "t10k-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(DataError, match=r"declares dimensions \(4294967295,\), expected \(10000,\)"):
        load_mnist("test", tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as file:
        file.write(struct.pack(">HBBII", 0, 8, 2, 100, 100))
    with pytest.raises(DataError, match=r"declares dimensions \(100, 100\), expected \(N,\)"):
        load_mnist("test", tmp_path, verify=False)


def test_data_dir_and_data_files_of_the_wrong_kind(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    assert_refused(tmp_path, ["train", "--data-dir", tmp_path / "file"], "is a regular file, expected a directory")
    os.mkfifo(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is a FIFO, expected a regular file"):
        load_mnist("test", tmp_path)


# --- checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An unfinished CLI-style checkpoint at step 5: epoch 0, batch 5, batch size 64."""
    loop = unitrain.make_loop("numpy", unitrain.mlp(), seed=0)
    loop.step_count = 5  # as if 5 steps were taken (the optimizer's step follows it)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", loop, epoch=0, batch=5, run=RUN)


def tampered(checkpoint: Path, destination: Path, edit) -> Path:
    """A copy of ``checkpoint`` whose manifest ``edit`` changed (a dict to change in place, or a
    function of the manifest's text returning the new text); fields are paths: "run/batch_size"."""
    folder = destination / "run" / checkpoint.name
    shutil.copytree(checkpoint, folder)
    text = (folder / MANIFEST).read_text()
    if callable(edit):
        text = edit(text)
    else:
        manifest = json.loads(text)
        for field, value in edit.items():
            *outer, last = field.split("/")
            target = manifest
            for key in outer:
                target = target[key]
            target[last] = value
        text = json.dumps(manifest)
    (folder / MANIFEST).write_text(text)
    return folder


MANIFEST_CASES = [
    ({"epoch": "0"}, "field 'epoch': expected an integer in 0..2^63-1, got '0'"),
    ({"run/batch_size": "64"}, "its run is invalid: field 'batch_size': expected an integer in 1..2^63-1, got '64'"),
    ({"run/batch_size": 0}, "its run is invalid: field 'batch_size': expected an integer in 1..2^63-1, got 0"),
    ({"seed": -1}, "field 'seed': expected an integer in 0..2^63-1, got -1"),
    ({"step": 2**200}, "field 'step': expected an integer in 0..2^63-1, got 2^200"),
    ({"batch": {"nested": [1, {"deeper": 2}]}}, "field 'batch': expected an integer"),
    ({"finished": "no"}, "field 'finished': expected true or false, got 'no'"),
    ({"epoch_loss/sum": float("nan")}, "field 'epoch_loss.sum': expected a finite number, got nan"),
    ({"optimizer/lr": "0.1"}, "field 'optimizer.lr': expected a finite number, got '0.1'"),
    ({"optimizer/type": "Lion"}, "field 'optimizer.type': expected one of 'SGD', 'Adam', 'AdamW'"),
    ({"run/model": "resnet"}, f"field 'run.model': expected a string matching {MODEL_PATTERN}, got 'resnet'"),
    ({"files/weights.safetensors/sha256": 12}, "field 'files.weights.safetensors.sha256': expected a string"),
    ({"files/optimizer.safetensors/bytes": 10**30}, "expected an integer in 0..2^63-1, got an integer of 100 bits"),
    ({"files": []}, "field 'files': expected an object, got []"),
    ({"versions": {"numpy": 1}}, "field 'versions.numpy': expected a string, got 1"),
    (lambda text: "[" * 200_000 + "]" * 200_000, "is not valid JSON (maximum recursion depth"),
    (lambda text: text.replace('"step": 5', '"step": ' + "9" * 5000), "is not valid JSON (Exceeds the limit"),
    (lambda text: text + " " * (1 << 21), "is over 1048576 bytes, not a manifest"),
]


@pytest.mark.parametrize(("edit", "message"), MANIFEST_CASES, ids=[str(i) for i in range(len(MANIFEST_CASES))])
def test_a_tampered_manifest_is_refused_naming_the_field(checkpoint, tmp_path, edit, message):
    folder = tampered(checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    assert f"checkpoint {folder} is damaged: {MANIFEST}" in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


RANGE_CASES = [
    ({"world_size": 0}, "field 'world_size': expected an integer in 1..65536, got 0"),
    ({"world_size": 10**6}, "field 'world_size': expected an integer in 1..65536, got 1000000"),
    ({"dtype": "object"}, "field 'dtype': expected one of 'float32', 'float64', got 'object'"),
    ({"normalization": {"mean": [0.1], "std": [0.0], "source": "x"}},
     "field 'normalization.std[0]': expected a finite number > 0, got 0.0"),
    ({"normalization": {"mean": [0.1], "std": [float("nan")], "source": "x"}},
     "field 'normalization.std[0]': expected a finite number > 0, got nan"),
    ({"normalization": {"mean": [0.1, 0.2], "std": [0.3], "source": "x"}}, "normalization has 2 means but 1 stds"),
    ({"loss": "MSELoss"}, "its loss MSELoss is not its run's, cross-entropy (CrossEntropyLoss)"),
    ({"loss": "os.system"}, "field 'loss': expected one of 'CrossEntropyLoss', "),
    ({"run_id": "../../etc"}, "field 'run_id': expected a string matching [A-Za-z0-9_-]{1,64}, got '../../etc'"),
    ({"files/extra.bin": {"bytes": 1, "sha256": "0" * 64}},
     "field 'files' holds 'extra.bin'; expected only weights.safetensors, optimizer.safetensors, random.safetensors"),
    ({"epoch_loss/count": 10**18, "epoch_loss/sum": 11.5}, "epoch_loss.count 1000000000000000000 is not the 5 steps"),
    ({"epoch_loss/count": 0, "epoch_loss/sum": 11.5}, "epoch_loss.count 0 is not the 5 steps taken in its epoch"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), RANGE_CASES, ids=[str(i) for i in range(len(RANGE_CASES))])
def test_every_manifest_field_is_range_checked(checkpoint, tmp_path, edit, message):
    """Fields that were accepted whatever they held; a count changed the reported loss on resume."""
    folder = tampered(checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    assert str(error.value).startswith(f"checkpoint {folder} is damaged: ") and message in str(error.value)


def test_a_run_id_is_a_token_not_a_path(tmp_path):
    loop = unitrain.make_loop("numpy", unitrain.mlp(), seed=0)
    with pytest.raises(ValueError, match="run_id '../x': expected 1 to 64 letters, digits"):
        save_checkpoint(tmp_path / "run", loop, epoch=0, batch=0, run_id="../x")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"[" * 200_000, "maximum recursion depth exceeded"),
        (json.dumps({"bit_generator": "PCG64", "state": {"state": 2**200, "inc": 1}, "has_uint32": 0,
                     "uinteger": 0}).encode(), "field 'state.state': expected an integer in 0..2^128-1, got 2^200"),
        (b'{"bit_generator": "MT19937"}', "field 'bit_generator': expected one of 'PCG64'"),
    ],
    ids=["nested JSON", "2^200", "another generator"],
)  # fmt: skip
def test_a_tampered_dropout_state_is_refused_on_restore(checkpoint, tmp_path, stream, message):
    folder = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, folder)
    save_safetensors(folder / RANDOM, {STREAM_KEY: np.frombuffer(stream, np.uint8)})
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / RANDOM).read_bytes()
    manifest["files"][RANDOM] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_checkpoint(folder)  # the bytes are opaque to the checkpoint; the stream reads them
    loop = unitrain.make_loop("numpy", unitrain.mlp(), optimizer=loaded.optimizer_spec(), seed=loaded.seed)
    with pytest.raises(CheckpointError, match="is not a numpy random state") as error:
        loaded.restore(loop)
    assert message in str(error.value)


def test_checkpoint_files_of_the_wrong_kind(checkpoint, tmp_path):
    folder = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, folder)
    (folder / "weights.safetensors").unlink()
    os.mkfifo(folder / "weights.safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors is a FIFO, expected a regular file"):
        load_checkpoint(folder)
    (folder / MANIFEST).unlink()
    os.symlink(MANIFEST, folder / MANIFEST)
    with pytest.raises(CheckpointError, match="checkpoint.json is a symlink loop"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"batch": 10**9}, "batches of 64 make 938 per epoch, so its batch 1000000000 must be in 0..937"),
        ({"run/batch_size": 10**12}, "so its batch 5 must be in 0..0"),
        ({"epoch": 7}, "so its step 5 must be epoch 7 x 938 + batch 5 = 6571"),
        ({"epoch": 7, "step": 6571}, "is already past the run's end (--epochs 3"),
        ({"seed": -1}, "checkpoint.json field 'seed': expected an integer in 0..2^63-1, got -1"),
    ],
    ids=["batch 10^9", "batch size 10^12", "epoch beyond the step", "epoch beyond the run", "seed -1"],
)
def test_a_tampered_resume_position_or_manifest_is_refused_by_the_cli(checkpoint, tmp_path, edit, message):
    folder = tampered(checkpoint, tmp_path, edit)
    if "step" in edit:  # the optimizer's step must follow the manifest's
        state, _ = load_safetensors(folder / "optimizer.safetensors")
        save_safetensors(folder / "optimizer.safetensors", {**state, "step": np.array(edit["step"], np.int64)})
        manifest = json.loads((folder / MANIFEST).read_text())
        data = (folder / "optimizer.safetensors").read_bytes()
        manifest["files"]["optimizer.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / MANIFEST).write_text(json.dumps(manifest))
    assert_refused(tmp_path, ["train", "--resume", folder], message)


def test_resume_from_a_regular_file_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    assert_refused(tmp_path, ["train", "--resume", tmp_path / "ckpt"], "is a regular file, expected a checkpoint")


# --- images -----------------------------------------------------------------------------------


def test_a_png_over_pillows_pixel_limit_is_refused_before_decoding(tmp_path, weights):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)  # 60000x60000, 8-bit grayscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    assert len(png) == 45
    (tmp_path / "bomb.png").write_bytes(png)
    shutil.copy(weights, tmp_path)
    assert_refused(tmp_path, ["predict", "--weights", tmp_path / weights.name, "--image", tmp_path / "bomb.png"],
                   "declares more pixels than Pillow decodes")  # fmt: skip
    os.mkfifo(tmp_path / "fifo.png")
    assert_refused(tmp_path, ["predict", "--weights", tmp_path / weights.name, "--image", tmp_path / "fifo.png"],
                   "is a FIFO, expected a PNG file")  # fmt: skip
