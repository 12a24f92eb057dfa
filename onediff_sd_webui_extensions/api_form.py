"""The API forms our users send, made to reach the webui: ``"script": "onediff_diffusion_model"`` and a
``script_args`` given as an object.

A1111's ``/sdapi/v1/txt2img`` and ``/img2img`` read the script from ``script_name``; OneDiff's README (and the
scripts written from it) send ``script``, which the webui's request model silently drops, so the job ran
eagerly and nothing said so. ``script_args`` must be a list there; ``{"0": true}`` was answered 422 before
any script saw it. :class:`ScriptFieldMiddleware` rewrites exactly these two forms, for this script only, in
the two routes only, before the webui reads the body; everything else reaches the webui byte for byte
(bodies that are not JSON objects too, so the webui's own validation errors still come back). A ``script``
naming another script, or disagreeing with ``script_name``, is answered 422 with what to send instead: never
guessed.

Nothing here imports the webui (plain ASGI), so it is tested without one.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Dict, List, Optional

SCRIPT_ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


class ApiFormError(ValueError):
    """A request whose ``script`` field cannot be mapped; the message says what to send."""


def _names(value: Any, title: str) -> bool:
    return isinstance(value, str) and value.strip().lower() == title.lower()


def _args_list(args: Dict[str, Any]) -> List[Any]:
    """``{"0": a, "1": b}`` -> ``[a, b]`` (the gradio form's shape); other keys are an error."""
    if not all(isinstance(key, str) and key.isdigit() for key in args):
        raise ApiFormError(f'"script_args" must be a list, or an object with keys "0", "1", ...; got keys '
                           f"{sorted(args)}")
    indices = sorted(int(key) for key in args)
    if indices != list(range(len(indices))):
        raise ApiFormError(f'"script_args" as an object needs keys "0" to "{len(indices) - 1}" without gaps; '
                           f"got {sorted(args)}")
    return [args[str(index)] for index in indices]


def rewrite_request(body: Any, title: str) -> Optional[Dict[str, Any]]:
    """The request to hand the webui instead of ``body``, or None when ``body`` needs no change.

    Raises :class:`ApiFormError` for a ``script`` that names another script or disagrees with
    ``script_name``."""
    if not isinstance(body, dict):
        return None
    changed = dict(body)
    script = body.get("script")
    if script is not None and script != "":
        script_name = body.get("script_name")
        if not _names(script, title):
            raise ApiFormError(
                f'"script": {json.dumps(script)} is not read by the webui (its field is "script_name"); only '
                f'"script": "{title}" is mapped, by the {title} extension. To run that script, send '
                f'"script_name": {json.dumps(script)}.'
            )
        if script_name not in (None, "") and not _names(script_name, title):
            raise ApiFormError(
                f'"script" says "{script}" but "script_name" says {json.dumps(script_name)}: send only one of them.'
            )
        del changed["script"]
        changed["script_name"] = title
    if _names(changed.get("script_name"), title) and isinstance(changed.get("script_args"), dict):
        changed["script_args"] = _args_list(changed["script_args"])
    return None if changed == body else changed


Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]


class ScriptFieldMiddleware:
    """ASGI middleware applying :func:`rewrite_request` to POSTs of :data:`SCRIPT_ROUTES`."""

    def __init__(self, app: Callable, title: str, authorized: Optional[Callable[[Dict[str, Any]], bool]] = None):
        self.app = app
        self.title = title
        # with the webui's API credentials set: a request without them passes untouched, so the webui's own
        # 401 answers it (never a 422 of ours, never a rewritten body behind its check)
        self.authorized = authorized

    async def __call__(self, scope: Dict[str, Any], receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in SCRIPT_ROUTES \
                or (self.authorized is not None and not self.authorized(scope)):
            await self.app(scope, receive, send)
            return
        chunks, messages = [], []
        while True:  # the whole body, however the client streamed it
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            request = json.loads(body) if body and messages[-1]["type"] == "http.request" else None
        except ValueError:
            request = None  # not JSON: the webui answers it as it always does
        try:
            changed = rewrite_request(request, self.title)
        except ApiFormError as error:
            await _send_json(send, 422, {"error": "ApiFormError", "detail": str(error)})
            return
        if changed is not None:
            body = json.dumps(changed).encode()
            headers = [(name, value) for name, value in scope.get("headers", [])
                       if name.lower() not in (b"content-length", b"transfer-encoding")]
            scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
            messages = [{"type": "http.request", "body": body, "more_body": False}]
        await self.app(scope, _replay(messages, receive), send)


def _replay(messages: List[Dict[str, Any]], receive: Receive) -> Receive:
    """A receive that hands out the buffered messages first, then defers to the server's."""
    pending = list(messages)

    async def replay() -> Dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replay


async def _send_json(send: Send, status: int, payload: Dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install(app: Any, title: str, authorized: Optional[Callable[[Dict[str, Any]], bool]] = None) -> None:
    """Put :class:`ScriptFieldMiddleware` in front of a FastAPI/Starlette ``app`` that may already be serving
    (A1111 calls ``on_app_started`` after the server started in UI mode): Starlette refuses to add middleware
    to a built stack, so the stack is dropped first and built again on the next request, as A1111's own
    ``setup_middleware`` does."""
    app.middleware_stack = None
    app.add_middleware(ScriptFieldMiddleware, title=title, authorized=authorized)
