"""The status route takes the webui's own API credentials (A1111's --api-auth, SD.Next's --auth/--auth-file)."""

import types

import pytest

from onediff_sd_webui_extensions import api_auth


def test_credentials_are_read_as_each_webui_reads_them(tmp_path):
    a1111 = types.SimpleNamespace(api_auth="alice:s3cret,bob:pa:ss")
    assert api_auth.credentials(a1111) == {"alice": "s3cret", "bob": "pa:ss"}
    auth_file = tmp_path / "users"
    auth_file.write_text('carol:one\n"dave": two \n')
    sdnext = types.SimpleNamespace(auth="erin:three", auth_file=str(auth_file))
    assert api_auth.credentials(sdnext) == {"erin": "three", "carol": "one", "dave": "two"}
    assert api_auth.credentials(types.SimpleNamespace(api_auth=None)) == {}


def test_only_the_right_password_passes():
    users = {"alice": "s3cret"}
    assert api_auth.check(users, "alice", "s3cret")
    assert not api_auth.check(users, "alice", "s3cre")
    assert not api_auth.check(users, "mallory", "s3cret")
    assert not api_auth.check({}, "", "")


def test_the_route_answers_401_without_credentials_and_200_with_them():
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    app = fastapi.FastAPI()
    api_auth.route(app, "/onediff/v1/status", lambda: {"busy": False},
                   api_auth.credentials(types.SimpleNamespace(api_auth="alice:s3cret")))
    client = TestClient(app)
    assert client.get("/onediff/v1/status").status_code == 401
    assert client.get("/onediff/v1/status", auth=("alice", "wrong")).status_code == 401
    answer = client.get("/onediff/v1/status", auth=("alice", "s3cret"))
    assert answer.status_code == 200 and answer.json() == {"busy": False}
    open_app = fastapi.FastAPI()
    api_auth.route(open_app, "/onediff/v1/status", lambda: {"busy": False},
                   api_auth.credentials(types.SimpleNamespace(api_auth=None)))
    assert TestClient(open_app).get("/onediff/v1/status").status_code == 200


def test_the_form_rewrite_leaves_requests_without_credentials_to_the_webuis_401():
    import asyncio
    import base64

    from onediff_sd_webui_extensions.api_form import ScriptFieldMiddleware

    seen = []

    async def webui(scope, receive, send):  # records the body the webui would read
        message = await receive()
        seen.append(message.get("body", b""))

    body = b'{"prompt": "x", "script": "other_script"}'  # would be answered 422 by the rewrite

    async def post(headers):
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        scope = {"type": "http", "method": "POST", "path": "/sdapi/v1/txt2img", "headers": headers}
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        middleware = ScriptFieldMiddleware(webui, "onediff_diffusion_model",
                                           authorized=api_auth.scope_check({"alice": "s3cret"}))
        await middleware(scope, receive, send)
        return sent

    assert asyncio.run(post([])) == [] and seen == [body]  # untouched: the webui answers it (401)
    token = base64.b64encode(b"alice:s3cret")
    sent = asyncio.run(post([(b"authorization", b"Basic " + token)]))
    assert sent[0]["status"] == 422 and len(seen) == 1  # with credentials the rewrite answers as before
    assert api_auth.scope_check({}) is None
