"""A client for a running webui, used by the integration tests of both hosts (JSON over urllib, images as
arrays), and starting and stopping one on loopback."""

import base64
import io
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest


class WebUI:
    """A running webui: JSON requests against its API and its log for failure messages."""

    def __init__(self, url, process, log_path, checkpoints, auth=None):
        self.url = url
        self.process = process
        self.log_path = log_path
        self.checkpoints = checkpoints
        self.auth = auth  # (user, password) for a webui started with API credentials

    def as_user(self, auth):
        """The same server, requested with other credentials (None: none)."""
        return WebUI(self.url, self.process, self.log_path, self.checkpoints, auth)

    def log_tail(self, lines=60):
        with open(self.log_path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])

    def request(self, path, body=None, timeout=1800):
        """(HTTP status, decoded JSON) for GET (no body) or POST (JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def post_ok(self, path, body):
        status, answer = self.request(path, body)
        assert status == 200, f"{path} answered {status}: {answer}\n--- webui log ---\n{self.log_tail()}"
        return answer

    @staticmethod
    def image(answer, index=0):
        """An answer's image as an int16 array (H, W, 3), so differences do not wrap around."""
        import numpy as np
        from PIL import Image

        png = base64.b64decode(answer["images"][index])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype("int16")

    def status(self):
        status, answer = self.request("/onediff/v1/status")
        assert status == 200, answer
        return answer


def checkout_from_env(variable, marker, what):
    """The folder the environment variable names; skip (unset) or fail (no ``marker`` file in it) with why."""
    folder = os.environ.get(variable)
    if not folder:
        pytest.skip(f"{variable} is not set: these tests run the real {what} (see README)")
    if not os.path.isfile(os.path.join(folder, marker)):
        pytest.fail(f"{variable}={folder} is not a {what} checkout (no {marker})")
    return folder


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(server, timeout_s, what="the webui"):
    """Return once ``server`` answers its model list; fail with the log's tail if it exits or times out."""
    deadline = time.time() + timeout_s
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"{what} exited with {server.process.returncode}\n{server.log_tail()}")
        try:
            status, _ = server.request("/sdapi/v1/sd-models", timeout=10)
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            pass
        if time.time() > deadline:
            pytest.fail(f"{what} did not answer within {timeout_s} s\n{server.log_tail()}")
        time.sleep(2)


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
