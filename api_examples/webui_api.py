"""The few calls the examples need, with urllib only, and messages that say what to do when something is wrong."""

import base64
import json
import os
import sys
import urllib.error
import urllib.request

SCRIPT = "onediff_diffusion_model"


class ExampleError(SystemExit):
    """Exit with a message instead of a traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def call(url, path, body=None, timeout=3600):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:2000]
        if error.code == 404 and path.startswith("/sdapi/"):
            raise ExampleError(f"{url} has no {path}: start the webui with --api") from None
        raise ExampleError(f"{path} answered HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise ExampleError(f"cannot reach the webui at {url} ({reason}); is it running with --api?") from None


def require_script(url, tab):
    """Stop with a clear message unless the onediff script is installed and selectable in ``tab``."""
    scripts = call(url, "/sdapi/v1/scripts")
    if SCRIPT not in scripts.get(tab, []):
        raise ExampleError(
            f"the script '{SCRIPT}' is not installed in the webui at {url} ({tab} lists: "
            f"{', '.join(scripts.get(tab, [])) or 'nothing'}); put this repository in the webui's extensions/ "
            "folder and restart it"
        )


def save_images(answer, out_dir, stem):
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for index, image in enumerate(answer.get("images", [])):
        path = os.path.join(out_dir, f"{stem}-{index}.png")
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(image.split(",", 1)[-1]))
        paths.append(path)
    return paths


def report(url, answer, paths):
    info = json.loads(answer.get("info") or "{}")
    onediff = info.get("extra_generation_params", {}).get("OneDiff", "(no OneDiff entry: the script did not run)")
    print(f"OneDiff: {onediff}")
    for path in paths:
        print(f"saved {path}")
    try:
        status = call(url, "/onediff/v1/status", timeout=30)
        print(f"status: {status['compiles']} compile(s), {status['reuses']} reuse(s), "
              f"{len(status['graphs'])} graph(s) cached, recompiles {status['recompiles']}")
    except SystemExit as error:
        print(f"(status route not available: {error})", file=sys.stderr)
