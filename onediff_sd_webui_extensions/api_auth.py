"""The webui's own API credentials on the extension's routes.

A1111 requires HTTP basic credentials on its ``/sdapi/v1/*`` routes when started with ``--api-auth
user:pass[,user2:pass2]``, SD.Next with ``--auth`` / ``--auth-file``; routes that extensions add to the app get
nothing of it. ``/onediff/v1/status`` takes the same credentials, parsed as each webui parses them and compared
in constant time, so it answers 401 exactly where ``/sdapi/v1/*`` does.
"""

from __future__ import annotations

import base64
from hmac import compare_digest
from typing import Any, Callable, Dict, List, Optional


def _pairs(text: str, separator: str) -> Dict[str, str]:
    credentials = {}
    for item in text.split(separator):
        if ":" in item:
            user, password = item.split(":", 1)
            credentials[user.replace('"', "").strip()] = password.replace('"', "").strip()
    return credentials


def credentials(cmd_opts: Any) -> Dict[str, str]:
    """User -> password from the webui's command line: A1111's ``--api-auth``, SD.Next's ``--auth`` and
    ``--auth-file`` (one ``user:pass`` per line). Empty when the API is open."""
    found: Dict[str, str] = {}
    for option in ("api_auth", "auth"):
        value: Optional[str] = getattr(cmd_opts, option, None)
        if value:
            found.update(_pairs(value, ","))
    auth_file = getattr(cmd_opts, "auth_file", None)
    if auth_file:
        with open(auth_file, encoding="utf8") as handle:
            found.update(_pairs(handle.read(), "\n"))
    return found


def check(users: Dict[str, str], username: str, password: str) -> bool:
    expected = users.get(username)
    return expected is not None and compare_digest(password.encode(), expected.encode())


def scope_check(users: Dict[str, str]) -> Optional[Callable[[Dict[str, Any]], bool]]:
    """For ASGI middleware: whether a request's ``Authorization: Basic`` header holds valid credentials; None
    when the API is open (every request is)."""
    if not users:
        return None

    def authorized(scope: Dict[str, Any]) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, encoded = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            username, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return check(users, username, password)

    return authorized


def dependencies(users: Dict[str, str]) -> List[Any]:
    """FastAPI dependencies for a route: none when ``users`` is empty, else HTTP basic auth against them
    (401 with ``WWW-Authenticate: Basic`` otherwise, as the webui answers)."""
    if not users:
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    # no annotations: FastAPI resolves them in this module's globals (postponed by __future__ annotations),
    # where the locally imported names are not
    def require(given=Depends(HTTPBasic())):
        if not check(users, given.username, given.password):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return [Depends(require)]


def route(app: Any, path: str, endpoint: Callable, users: Dict[str, str]) -> None:
    """``GET path`` on ``app``, behind ``users``' credentials (:func:`credentials`) when there are any."""
    app.add_api_route(path, endpoint, methods=["GET"], dependencies=dependencies(users))
