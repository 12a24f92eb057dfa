"""The persistent compile cache across processes: a second process with the same cache folder loads instead of
compiling, computes with its own weights, and any other key or a damaged entry is never used.

Every child process gets a fresh, empty TORCHINDUCTOR_CACHE_DIR, so the only warm path is our cache folder.
Only two cold compiles of the tiny UNet-sized work happen: one of the tiny preset (process 1) and a small MLP
for the damaged-entry round trip; everything about keys is checked without compiling.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from compile import CompileOptions, GraphCache, PersistentCache
from compile.models import build_preset
from compile.persistent_cache import MANIFEST, key_fields

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_child(args, inductor_dir):
    """Run a Python child in the repository root with its own empty inductor cache; its last stdout line is JSON."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir))
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bench_cache(cache_dir, inductor_dir, seed):
    return _run_child(
        ["-m", "onediff_sd_webui_extensions.bench.cache", "--cache-dir", str(cache_dir), "--seed", str(seed)],
        inductor_dir,
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The tiny preset compiled in process 1 (weights seed 0), then loaded in process 2 (weights seed 1)."""
    base = tmp_path_factory.mktemp("persistent")
    cache_dir = base / "cache"
    first = _bench_cache(cache_dir, base / "inductor-1", seed=0)
    second = _bench_cache(cache_dir, base / "inductor-2", seed=1)
    return {"cache_dir": cache_dir, "base": base, "first": first, "second": second}


def _tiny_key(**overrides):
    options = overrides.pop("options", None)
    key, _ = GraphCache(max_graphs=1).key_for(build_preset("tiny", seed=0, **overrides), "inductor", options)
    return key


def test_second_process_loads_from_cache_and_is_faster(two_processes):
    first, second = two_processes["first"]["cache"], two_processes["second"]["cache"]
    ratio = second["compile_s"] / first["compile_s"]
    print(f"\nfirst call: cold {first['compile_s']:.1f} s, from cache {second['compile_s']:.1f} s, ratio {ratio:.3f}")
    assert first["hit"] is False and "problem" not in first
    assert second["hit"] is True and "problem" not in second
    assert ratio < 0.6
    # Everything inductor wrote went into our folder, none into the process's own inductor cache.
    assert not os.path.exists(two_processes["base"] / "inductor-1" / "fxgraph")


def test_output_from_cache_equals_eager_on_current_weights(two_processes):
    # Process 2 has other weights (seed 1) than the process that compiled (seed 0): a graph that had kept the
    # compiling process's weights would differ from eager by far more than float rounding.
    first_weights = build_preset("tiny", seed=0).conv_in.weight
    second_weights = build_preset("tiny", seed=1).conv_in.weight
    assert not torch.equal(first_weights, second_weights)
    assert two_processes["first"]["max_abs_diff"] < 1e-4
    assert two_processes["second"]["max_abs_diff"] < 1e-4


def test_entry_holds_no_weights(two_processes):
    """Parameters are graph inputs: no randomly initialised weight's bytes appear in any cached file."""
    cached = b"".join(
        open(os.path.join(folder, name), "rb").read()
        for folder, _, names in os.walk(two_processes["cache_dir"])
        for name in names
    )
    for seed in (0, 1):
        random_weights = [
            parameter.flatten()[:8].numpy().tobytes()
            for parameter in build_preset("tiny", seed=seed).parameters()
            if parameter.numel() >= 8 and parameter.flatten()[:8].unique().numel() == 8  # not ones/zeros
        ]
        assert len(random_weights) > 100
        assert not [weights for weights in random_weights if weights in cached]


def test_changed_key_misses(two_processes):
    cache = PersistentCache(str(two_processes["cache_dir"]))
    assert cache.check(key_fields(_tiny_key())).status == "hit"
    changed = {
        "signature": _tiny_key(in_channels=9),
        "options": _tiny_key(options=CompileOptions(mode="max-autotune-no-cudagraphs")),
        "quantization": _tiny_key(options=CompileOptions(quantization="int8")),
        "dtype": _tiny_key(dtype=torch.bfloat16),
    }
    for what, key in changed.items():
        assert cache.check(key_fields(key)).status == "miss", what


def test_entry_under_another_key_is_refused(two_processes, tmp_path):
    """An entry copied to another key's folder (same files, manifest of the original key) never loads."""
    shutil.copytree(two_processes["cache_dir"], tmp_path / "cache")
    cache = PersistentCache(str(tmp_path / "cache"))
    original, other = key_fields(_tiny_key()), key_fields(_tiny_key(dtype=torch.bfloat16))
    shutil.copytree(cache.entry_path(original), cache.entry_path(other))
    verdict = cache.check(other)
    assert verdict.status == "invalid" and "another key" in verdict.problem and "dtype" in verdict.problem
    stored = cache.open(_tiny_key(dtype=torch.bfloat16))
    assert not stored.hit and "another key" in stored.problem
    assert not os.path.exists(stored.path)  # removed, to be filled by the recompile
    assert cache.check(original).status == "hit"


# A small MLP compiles in seconds; it exercises the damaged-entry round trip through GraphCache in children.
_MLP_CHILD = """
import json, sys, torch
from compile import GraphCache, PersistentCache
torch.set_grad_enabled(False)
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
x = torch.randn(4, 32)
lookup = GraphCache(persistent=PersistentCache(sys.argv[1])).get(mlp, "inductor")
out = lookup.unet(x)
entry = lookup.entry
print(json.dumps({"hit": entry.cache_hit, "problem": entry.cache_problem, "compile_s": entry.compile_s,
                  "max_abs_diff": (out - mlp(x)).abs().max().item(), "path": entry.stored.path}))
"""


def test_truncated_file_is_reported_and_recompiled(tmp_path):
    cache_dir = tmp_path / "cache"
    filled = _run_child(["-c", _MLP_CHILD, str(cache_dir)], tmp_path / "inductor-1")
    assert filled["hit"] is False and filled["problem"] is None
    manifest_path = os.path.join(filled["path"], MANIFEST)
    with open(manifest_path) as handle:
        files = json.load(handle)["files"]
    largest = max(files, key=lambda name: files[name]["size"])
    with open(os.path.join(filled["path"], largest), "r+b") as handle:
        handle.truncate(files[largest]["size"] // 2)

    recompiled = _run_child(["-c", _MLP_CHILD, str(cache_dir)], tmp_path / "inductor-2")
    print(f"\nreported: {recompiled['problem']}")
    assert recompiled["hit"] is False
    assert largest in recompiled["problem"] and "truncated" in recompiled["problem"]
    assert recompiled["max_abs_diff"] < 1e-5

    # The entry was rewritten: it verifies again, and the next process loads it.
    reloaded = _run_child(["-c", _MLP_CHILD, str(cache_dir)], tmp_path / "inductor-3")
    assert reloaded["hit"] is True and reloaded["problem"] is None
    assert reloaded["max_abs_diff"] < 1e-5


def _stored_toy_entry(folder):
    """An entry filled by hand (no compile): one file in the inductor folder and its manifest."""
    cache = PersistentCache(str(folder))
    key, _ = GraphCache(max_graphs=1).key_for(torch.nn.Linear(4, 4), "inductor")
    stored = cache.open(key)
    os.makedirs(os.path.join(stored.inductor_folder, "ab"))
    with open(os.path.join(stored.inductor_folder, "ab", "kernel.so"), "wb") as handle:
        handle.write(b"\x7fELF" + bytes(range(256)) * 8)
    stored.save(first_call_s=12.5)
    return cache, key, stored


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "SHA-256"),
        ("truncate", "truncated"),
        ("unlisted", "unrecorded"),
        ("remove", "missing"),
        ("manifest_garbage", "unreadable manifest"),
        ("no_manifest", "no manifest"),
    ],
)
def test_damaged_entry_is_reported_and_emptied(tmp_path, damage, message):
    cache, key, stored = _stored_toy_entry(tmp_path)
    fields = key_fields(key)
    assert cache.check(fields).status == "hit"
    kernel = os.path.join(stored.inductor_folder, "ab", "kernel.so")
    manifest = os.path.join(stored.path, MANIFEST)
    if damage == "flip":
        with open(kernel, "r+b") as handle:
            handle.seek(100)
            handle.write(b"\x00")
    elif damage == "truncate":
        with open(kernel, "r+b") as handle:
            handle.truncate(10)
    elif damage == "unlisted":
        with open(os.path.join(stored.inductor_folder, "ab", "extra.py"), "w") as handle:
            handle.write("print('not recorded')\n")
    elif damage == "remove":
        os.remove(kernel)
    elif damage == "manifest_garbage":
        with open(manifest, "w") as handle:
            handle.write('{"key": ')
    elif damage == "no_manifest":
        os.remove(manifest)
    verdict = cache.check(fields)
    assert verdict.status == "invalid" and message in verdict.problem
    reopened = cache.open(key)
    assert not reopened.hit and message in reopened.problem
    assert reopened.notice == f"stored graph refused ({verdict.reason}), compiled afresh"  # the job's info
    assert not os.path.exists(reopened.path)
    if damage in ("flip", "truncate", "unlisted", "remove"):  # the manifest was fine: its compile time is known
        assert reopened.expected_s == 12.5


def test_manifest_keeps_cold_compile_and_last_load_time(tmp_path):
    cache, key, _ = _stored_toy_entry(tmp_path)  # a miss whose first call (the compile) took 12.5 s
    loaded = cache.open(key)
    assert loaded.hit and loaded.expected_s is None  # never loaded yet: no load time to announce
    loaded.save(first_call_s=3.0)  # what CompiledUNet does after a hit's first call
    reloaded = cache.open(key)
    assert reloaded.hit and reloaded.expected_s == 3.0  # "loading, took ~3 s last time"
    assert (reloaded.manifest["compile_s"], reloaded.manifest["load_s"]) == (12.5, 3.0)


def test_size_and_clear(tmp_path):
    cache, key, stored = _stored_toy_entry(tmp_path)
    assert cache.size_bytes() >= 8 * 256
    assert [manifest["key"] for manifest in cache.entries()] == [key_fields(key)]
    removed, freed = cache.clear()
    assert (removed, cache.size_bytes()) == (1, 0) and freed >= 8 * 256
    stored.save(first_call_s=1.0)  # a graph created before the clear does not write into the emptied cache
    assert cache.size_bytes() == 0 and cache.check(key_fields(key)).status == "miss"


def test_a_quantized_graph_is_keyed_with_the_inductor_settings_it_is_compiled_with():
    from compile.backends import QUANTIZED_INDUCTOR_CONFIG

    float_key, int8_key = _tiny_key(), _tiny_key(options=CompileOptions(quantization="int8"))
    assert "inductor_config" not in key_fields(float_key)  # keys of stored float graphs did not change
    assert key_fields(int8_key)["inductor_config"] == QUANTIZED_INDUCTOR_CONFIG


posix_only = pytest.mark.skipif(os.name != "posix", reason="ownership and modes are POSIX's")


@posix_only
@pytest.mark.parametrize("tamper, message", [
    ("folder_world_writable", "can be written by other users (mode 777)"),
    ("file_group_writable", "kernel.so can be written by other users (mode 664)"),
    ("file_of_another_user", "kernel.so belongs to another user (uid 54321)"),
])
def test_an_entry_others_can_write_is_never_loaded(tmp_path, tamper, message):
    """Generated code runs when loaded: an entry someone else could have written is refused (not loaded, not
    written to, not deleted), and said why; the graph compiles with torch's default cache instead."""
    cache, key, stored = _stored_toy_entry(tmp_path / "cache")
    kernel = os.path.join(stored.inductor_folder, "ab", "kernel.so")
    assert os.stat(kernel).st_mode & 0o022 == 0  # what this process wrote, tightened when it was recorded
    if tamper == "folder_world_writable":
        os.chmod(cache.folder, 0o777)
    elif tamper == "file_group_writable":
        os.chmod(kernel, 0o664)
    elif os.getuid() != 0:
        pytest.skip("only root can give a file to another user")
    else:
        os.chown(kernel, 54321, 54321)
    reopened = cache.open(key)
    assert reopened.bypassed and not reopened.hit and message in reopened.problem
    assert "it must be writable by you only" in reopened.problem
    assert os.path.exists(kernel)  # someone else's files are left alone
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with reopened.activated():  # the folder is not switched in for inductor
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
    reopened.save(first_call_s=1.0)
    assert cache.check(key_fields(key)).manifest["compile_s"] == 12.5  # nothing rewritten


@posix_only
def test_a_cache_under_a_folder_others_can_change_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # world-writable without the sticky bit: anyone can replace the cache folder
    cache = PersistentCache(str(shared / "cache"))
    key, _ = GraphCache(max_graphs=1).key_for(torch.nn.Linear(4, 4), "inductor")
    assert "above the compile cache, can be changed by other users" in cache.open(key).problem
    assert cache.status()["untrusted"]
    os.chmod(shared, 0o1777)  # sticky, as /tmp: others cannot rename or remove what is ours
    assert cache.open(key).bypassed is False and cache.status()["untrusted"] is None


def test_a_read_only_folder_is_bypassed_not_failed(tmp_path, monkeypatch):
    """A folder this process cannot write (a read-only mount): graphs compile without it, never a failed
    compiled call. (Root may write anywhere: the permission answer is what the check reads, so it is faked.)"""
    from compile import persistent_cache

    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setattr(persistent_cache.os, "access", lambda path, mode: False)
    key, _ = GraphCache(max_graphs=1).key_for(torch.nn.Linear(4, 4), "inductor")
    stored = PersistentCache(str(folder)).open(key)
    assert stored.bypassed and "cannot be written (read-only?)" in stored.problem
    assert stored.notice == "compile cache not used (read-only)"
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with stored.activated():
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before


class _SmallNet(torch.nn.Module):
    """A module of its own class, so its compile is never served by dynamo's memory of another test's graph."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.second(torch.nn.functional.gelu(self.first(x)))


def test_a_compile_that_cannot_write_into_the_folder_runs_without_it(tmp_path, monkeypatch):
    """A full disk (a failed write injected into inductor's file writer, for paths in the cache folder only):
    the graph compiles again with torch's own cache folder, the job stays compiled and says why in a few words,
    and what the failed compile left in the folder is removed. (Before: the compiled call failed, the job
    finished eagerly and the graph was marked failed for the rest of the session.)"""
    import errno

    from torch._inductor import codecache

    folder = tmp_path / "cache"
    real_write = codecache.write_atomic

    def disk_full_in_the_cache_folder(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(codecache, "write_atomic", disk_full_in_the_cache_folder)
    module, x = _SmallNet().eval(), torch.randn(2, 8)
    lookup = GraphCache(max_graphs=1, persistent=PersistentCache(str(folder))).get(module, "inductor")
    with torch.no_grad():
        assert torch.allclose(lookup.unet(x), module(x), atol=1e-5)
    stored = lookup.entry.stored
    assert stored.bypassed and lookup.entry.cache_notice == "compile cache not used (No space left on device)"
    assert "writing into" in lookup.entry.cache_problem and not os.path.exists(stored.path)


def test_a_folder_deleted_while_running_is_made_again(tmp_path):
    """The cache folder removed between calls (a user cleaning up): a graph already built keeps running, a new
    size compiles into a new folder, and its entry verifies."""
    folder = tmp_path / "cache"
    module = _SmallNet().eval()
    cache = GraphCache(max_graphs=1, persistent=PersistentCache(str(folder)))
    lookup = cache.get(module, "inductor", CompileOptions(dynamic=False))
    with torch.no_grad():
        lookup.unet(torch.randn(2, 8))
        shutil.rmtree(folder)
        x = torch.randn(2, 8)
        assert torch.allclose(lookup.unet(x), module(x), atol=1e-5)
        x = torch.randn(5, 8)  # a new size: compiled into the folder made again
        assert torch.allclose(lookup.unet(x), module(x), atol=1e-5)
    assert lookup.entry.recompiles == 1 and lookup.entry.cache_problem is None
    assert cache.persistent.check(key_fields(lookup.entry.key)).status == "hit"
