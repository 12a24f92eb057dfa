"""The bench refuses arguments it cannot run with before building anything: one line naming the argument and
what it accepts, exit code 2, no traceback."""

import os
import struct
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from onediff_sd_webui_extensions.__main__ import main


def _bench(capsys, *argv):
    code = main(["bench", *argv])
    return code, capsys.readouterr().err


def _safetensors(path, header: bytes, declared=None):
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "bench: error: --batch: 0 is not allowed; a batch of 1 or more"),
    (["--batch", "-1"], "bench: error: --batch: -1 is not allowed"),
    (["--latent", "0"], "bench: error: --latent: 0 is not allowed; a multiple of 8 from 8"),
    (["--latent", "-8"], "bench: error: --latent: -8 is not allowed"),
    (["--latent", "20"], "bench: error: --latent: 20 is not allowed"),
    (["--repeat", "0"], "bench: error: --repeat: 0 is not allowed; 1 or more timed calls"),
    (["--warmup", "-1"], "bench: error: --warmup: -1 is not allowed"),
    (["--mode", "nonsense"], "bench: error: --mode: 'nonsense' is not one of auto, default, reduce-overhead"),
    (["--device", "gpu"], "bench: error: --device: 'gpu' is not one of auto, cpu, cuda"),
    (["--device", "mps"], "bench: error: --device: 'mps' is not one of auto, cpu, cuda"),
    (["--repositories", "/nonexistent", "--no-lora"], "bench: error: --repositories: /nonexistent has no"),
    (["--repositories", "/nonexistent"], "bench: error: --repositories: times the webui's UNet classes"),
])
def test_bad_numbers_and_names_are_refused_in_one_line(capsys, argv, message):
    code, err = _bench(capsys, *argv)
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU")
def test_cuda_on_a_torch_without_it(capsys):
    code, err = _bench(capsys, "--device", "cuda")
    assert code == 2 and err.startswith("bench: error: --device: cuda is not available: this torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU")
def test_fp8_where_it_cannot_run_is_refused_before_timing(capsys):
    code, err = _bench(capsys, "--quant", "fp8")
    assert code == 2 and err.startswith("bench: error: --quant: fp8 cannot run on cpu here:")


def test_output_paths_are_checked_first(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    missing = tmp_path / "missing" / "out.json"
    code, err = _bench(capsys, "--json", str(missing), "--batch", "0")  # the path is checked before the batch
    assert code == 2 and err.startswith(f"bench: error: --json: the folder {missing.parent} does not exist")
    code, err = _bench(capsys, "--json", str(tmp_path))
    assert code == 2 and err.startswith(f"bench: error: --json: {tmp_path} is a folder")
    code, err = _bench(capsys, "--cache-dir", str(a_file))
    assert code == 2 and err.startswith(f"bench: error: --cache-dir: {a_file} is a file; give a folder")


def test_checkpoints_that_are_not_safetensors_files(capsys, tmp_path):
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases = [
        (str(tmp_path / "gone.safetensors"), "checkpoint not found"),
        (str(folder), "is a folder, not a .safetensors file"),
        (str(empty), "is not a readable .safetensors file (0 bytes, too short for a header)"),
        (_safetensors(tmp_path / "big.safetensors", b"{}", declared=2**40), "its header length is larger than the file"),
        (_safetensors(tmp_path / "text.safetensors", b"not json"), "its header is not JSON"),
        (_safetensors(tmp_path / "none.safetensors", b'{"__metadata__": {}}'), "it holds no tensors"),
    ]
    for path, message in cases:
        code, err = _bench(capsys, "--checkpoint", path)
        assert code == 2 and err.startswith("bench: error: --checkpoint: ") and message in err, err


def test_the_cli_exits_2_without_a_traceback_and_debug_shows_it():
    command = [sys.executable, "-m", "onediff_sd_webui_extensions", "bench", "--batch", "0"]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    debug = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, ONEDIFF_DEBUG="1"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "BenchArgumentError" in debug.stderr
