"""The bench's arguments, checked before any model is built: a bad one is answered in one line that names it and
says what it accepts (``bench: error: --batch: ...``, exit code 2), not by a traceback minutes later.

Output paths (``--json``, ``--cache-dir``) are checked first of all, so a long run never ends by losing its
report; so is whether the device can run what was asked (``--device cuda`` on a CPU-only torch, ``--quant
fp8`` without the hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import struct

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
SAFETENSORS_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size


class BenchArgumentError(ValueError):
    """One argument the bench cannot run with: ``str()`` is the whole message."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")


def _writable_folder(folder: str) -> bool:
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def check_json_path(path: str) -> None:
    if os.path.isdir(path):
        raise BenchArgumentError("--json", f"{path} is a folder; give a file name, e.g. {os.path.join(path, 'bench.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BenchArgumentError("--json", f"the folder {folder} does not exist; create it or write elsewhere")
    if not _writable_folder(folder) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise BenchArgumentError("--json", f"{path} cannot be written (permissions)")


def check_cache_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise BenchArgumentError("--cache-dir", f"{path} is a file; give a folder (it is created if missing)")
    existing = path
    while not os.path.exists(existing):  # the nearest existing parent must let us create the folder
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise BenchArgumentError("--cache-dir", f"{path} cannot be created or written (permissions)")


def check_checkpoint(path: str) -> None:
    """An existing ``.safetensors`` file whose header reads as one (the tensors are read later)."""
    if os.path.isdir(path):
        raise BenchArgumentError("--checkpoint", f"{path} is a folder, not a .safetensors file")
    if not os.path.isfile(path):
        raise BenchArgumentError("--checkpoint", f"checkpoint not found: {path}")
    if not path.endswith(".safetensors"):
        raise BenchArgumentError("--checkpoint", f"{path}: only .safetensors checkpoints are read (convert a .ckpt first)")
    problem = _safetensors_problem(path)
    if problem:
        raise BenchArgumentError("--checkpoint", f"{path} is not a readable .safetensors file ({problem})")


def _safetensors_problem(path: str) -> str:
    size = os.path.getsize(path)
    if size < 8:
        return f"{size} bytes, too short for a header"
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if header_size > min(SAFETENSORS_MAX_HEADER, size - 8):
            return "its header length is larger than the file"
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not JSON"
    if not isinstance(header, dict) or not any(key != "__metadata__" for key in header):
        return "it holds no tensors"
    return ""


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise BenchArgumentError("--device", f"'{device}' is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that sees no GPU"
        raise BenchArgumentError("--device", f"cuda is not available: this torch ({torch.__version__}) is {build}")


def _positive(argument: str, value, minimum: int, what: str) -> None:
    if value is not None and value < minimum:
        raise BenchArgumentError(argument, f"{value} is not allowed; {what}")


def validate(args: argparse.Namespace) -> None:
    """Raise :class:`BenchArgumentError` for the first argument the bench cannot run with."""
    if args.json:
        check_json_path(args.json)
    if args.cache_dir:
        check_cache_dir(args.cache_dir)
    check_device(args.device)
    if args.cold and args.cache_dir:
        raise BenchArgumentError("--cold", "times a compile with every cache off; leave out --cache-dir")
    if args.mode not in MODES:
        raise BenchArgumentError("--mode", f"'{args.mode}' is not one of {', '.join(MODES)}")
    _positive("--batch", args.batch, 1, "a batch of 1 or more (2 = one image with CFG)")
    _positive("--warmup", args.warmup, 0, "0 or more untimed calls")
    _positive("--repeat", args.repeat, 1, "1 or more timed calls (5 or more for a spread worth reading)")
    if args.latent is not None and (args.latent < 8 or args.latent % 8):
        raise BenchArgumentError("--latent", f"{args.latent} is not allowed; a multiple of 8 from 8 (image size / 8, "
                                             "e.g. 64 for 512x512)")
    if args.checkpoint:
        check_checkpoint(args.checkpoint)
    if args.repositories:
        if args.checkpoint or args.lora or args.quant != "none":
            raise BenchArgumentError("--repositories", "times the webui's UNet classes with random weights: use it "
                                                       "with a --preset and --no-lora, without --checkpoint or --quant")
        for sub in ("stable-diffusion-stability-ai", "generative-models"):
            if not os.path.isdir(os.path.join(args.repositories, sub)):
                raise BenchArgumentError("--repositories", f"{args.repositories} has no {sub}/ folder (give a "
                                                           "webui's repositories/ folder)")
    if args.quant != "none":
        from compile.quantization import int8_availability

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        reason = int8_availability(device, args.quant, resolve_dtype(args.dtype, device))
        if reason:
            raise BenchArgumentError("--quant", f"{args.quant} cannot run on {device} here: {reason}")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``--dtype``: ``auto`` is float16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return DTYPES[name]
