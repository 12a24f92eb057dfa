"""The API examples against a small loopback HTTP server that answers like the webui: PNGs saved, and clear
messages when the server is unreachable or the script is not installed."""

import base64
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "api_examples")


def _png():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class FakeWebUI(http.server.BaseHTTPRequestHandler):
    scripts = ["onediff_diffusion_model"]
    requests = []

    def _json(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/sdapi/v1/scripts":
            self._json({"txt2img": self.scripts, "img2img": self.scripts})
        elif self.path == "/onediff/v1/status":
            self._json({"compiles": 1, "reuses": 0, "graphs": [{}], "recompiles": 0})
        else:
            self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        info = {"extra_generation_params": {"OneDiff": "inductor, compiled UNetModel:abc"}}
        self._json({"images": [_png()], "info": json.dumps(info)})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_webui():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeWebUI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeWebUI.requests = []
    FakeWebUI.scripts = ["onediff_diffusion_model"]
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run_example(name, *args):
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                          timeout=120)


def test_txt2img_saves_pngs_and_sends_script_name(fake_webui, tmp_path):
    result = run_example("txt2img.py", "--url", fake_webui, "--out", str(tmp_path), "--int8")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "txt2img-1-0.png").read_bytes().startswith(b"\x89PNG")
    path, body = FakeWebUI.requests[0]
    assert path == "/sdapi/v1/txt2img"
    assert body["script_name"] == "onediff_diffusion_model" and body["script_args"] == [True]
    assert "OneDiff: inductor" in result.stdout


def test_img2img_sends_the_input_image(fake_webui, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes(base64.b64decode(_png()))
    result = run_example("img2img.py", "--url", fake_webui, "--out", str(tmp_path), "--image", str(source))
    assert result.returncode == 0, result.stderr
    path, body = FakeWebUI.requests[0]
    assert path == "/sdapi/v1/img2img" and body["init_images"] == [_png()]
    assert (tmp_path / "img2img-1-0.png").exists()


def test_script_not_installed_is_said_plainly(fake_webui, tmp_path):
    FakeWebUI.scripts = ["x/y/z plot"]
    result = run_example("txt2img.py", "--url", fake_webui, "--out", str(tmp_path))
    assert result.returncode != 0
    assert "'onediff_diffusion_model' is not installed" in result.stderr
    assert FakeWebUI.requests == []  # nothing generated without the script


def test_unreachable_server_is_said_plainly(tmp_path):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_example("txt2img.py", "--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "cannot reach the webui" in result.stderr and "Traceback" not in result.stderr
