"""The API forms mapped for the webui (``script``, ``script_args`` as an object), through plain ASGI calls."""

import asyncio
import json

import pytest

from onediff_sd_webui_extensions.api_form import ApiFormError, ScriptFieldMiddleware, rewrite_request

TITLE = "onediff_diffusion_model"


@pytest.mark.parametrize("body, expected", [
    ({"prompt": "x", "script": TITLE}, {"prompt": "x", "script_name": TITLE}),
    ({"script": "OneDiff_Diffusion_Model", "script_args": [True]}, {"script_name": TITLE, "script_args": [True]}),
    ({"script": TITLE, "script_name": TITLE.upper()}, {"script_name": TITLE}),
    ({"script_name": TITLE, "script_args": {"0": True}}, {"script_name": TITLE, "script_args": [True]}),
    ({"script": TITLE, "script_args": {"1": "b", "0": "a"}}, {"script_name": TITLE, "script_args": ["a", "b"]}),
])
def test_our_script_is_mapped(body, expected):
    assert rewrite_request(body, TITLE) == expected


@pytest.mark.parametrize("body", [
    {"prompt": "x"}, {"script_name": TITLE, "script_args": [True]}, {"script": None}, {"script": ""},
    {"script_name": "other", "script_args": {"0": 1}},  # another script's arguments are the webui's business
    [1, 2], "text", None,
])
def test_everything_else_is_left_alone(body):
    assert rewrite_request(body, TITLE) is None


@pytest.mark.parametrize("body, message", [
    ({"script": "x/y plot"}, r'"script": "x/y plot" is not read by the webui .* send "script_name": "x/y plot"'),
    ({"script": TITLE, "script_name": "x/y plot"}, r'"script_name" says "x/y plot": send only one of them'),
    ({"script": 3}, r'"script": 3 is not read'),
    ({"script": TITLE, "script_args": {"a": 1}}, r'keys "0", "1", \.\.\.'),
    ({"script": TITLE, "script_args": {"0": 1, "2": 1}}, r"without gaps"),
])
def test_what_cannot_be_mapped_says_what_to_send(body, message):
    with pytest.raises(ApiFormError, match=message):
        rewrite_request(body, TITLE)


def run(path, chunks, method="POST"):
    """Send ``chunks`` as one request through ``middleware``; returns (what the app saw, what was sent back)."""
    seen, sent = {}, []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.update(scope=scope, body=body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    incoming = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                for i, chunk in enumerate(chunks)]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"999")]}
    asyncio.run(ScriptFieldMiddleware(app, TITLE)(scope, receive, send))
    return seen, sent


def test_a_streamed_body_is_rewritten_with_its_length():
    body = json.dumps({"prompt": "a cat", "script": TITLE, "script_args": {"0": True}}).encode()
    seen, sent = run("/sdapi/v1/txt2img", [body[:10], body[10:30], body[30:]])
    assert json.loads(seen["body"]) == {"prompt": "a cat", "script_name": TITLE, "script_args": [True]}
    headers = dict(seen["scope"]["headers"])
    assert headers[b"content-length"] == str(len(seen["body"])).encode()
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("path, method, body", [
    ("/sdapi/v1/txt2img", "POST", b'{"prompt": "x", "steps": "not a number"'),  # not JSON: the webui answers
    ("/sdapi/v1/img2img", "POST", b'{"prompt": "x"}'),
    ("/sdapi/v1/options", "POST", json.dumps({"script": "anything"}).encode()),  # other routes: untouched
    ("/sdapi/v1/txt2img", "GET", b""),
])
def test_other_requests_pass_byte_for_byte(path, method, body):
    seen, _ = run(path, [body[:5], body[5:]], method=method)
    assert seen["body"] == body
    assert dict(seen["scope"]["headers"])[b"content-length"] == b"999"


def test_an_unmappable_script_is_answered_422_without_reaching_the_webui():
    seen, sent = run("/sdapi/v1/img2img", [json.dumps({"script": "x/y plot"}).encode()])
    assert seen == {}
    assert sent[0]["status"] == 422
    assert 'send "script_name": "x/y plot"' in json.loads(sent[1]["body"])["detail"]
