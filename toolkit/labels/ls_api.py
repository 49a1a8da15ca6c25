"""A small client for Label Studio's REST API, as `clipfail labelstudio push` and `pull` use it.

Written against Label Studio 1.23.2 (its installed source and a running server; tests/test_labelstudio_live.py
checks it), with the standard library only (label-studio-sdk is not a dependency):

- Authentication: a legacy API token (`Authorization: Token <key>`), or a personal access token (a JWT, the
  default kind since Label Studio 1.14), which is first exchanged for an access token at
  `POST /api/token/refresh/` (`{"refresh": token}` -> `{"access": ...}`) and then sent as
  `Authorization: Bearer <access>`.
- Every answer is read as JSON through toolkit.userfiles (invalid UTF-8, NaN and deep nesting are refused)
  and its shape is checked by the caller with the `want_*` checks.

Every failed request raises one UserError that names the request (`GET /api/projects/3`), what went wrong
(unreachable, HTTP status, not JSON, wrong shape) and what to do.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

from toolkit.errors import UserError
from toolkit.userfiles import JsonShapeError, parse_json

DEFAULT_URL = "http://localhost:8080"
TIMEOUT_S = 120.0  # an export of a large project takes a while
MAX_ANSWER = 512 * 1024 * 1024  # bytes read from one answer at most
TOKEN_HINT = (
    "Give the API token of a Label Studio user with --token or LABEL_STUDIO_API_KEY (Label Studio: Account & "
    "Settings; a legacy token needs the organization's legacy tokens enabled)."
)
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class LabelStudio:
    """One Label Studio server: `request()` sends a request and returns the parsed JSON answer."""

    def __init__(self, url: str | None, token: str | None, timeout: float = TIMEOUT_S):
        url = (url or DEFAULT_URL).strip()
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018  (a port that is not a number raises here, not in the first request)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(
                f"--url {url!r} is not a Label Studio address; give one such as http://localhost:8080 "
                "(where Label Studio's start page is)."
            )
        self.url = url.rstrip("/")
        token = (token or "").strip()
        if not token:
            raise UserError(f"No Label Studio API token. {TOKEN_HINT}")
        if not all("!" <= ch <= "~" for ch in token):  # it goes into an HTTP header: printable ASCII, no spaces
            raise UserError(
                f"The Label Studio API token holds a space, a line break or a character that is not plain ASCII "
                f"(a paste that took more than the token?). {TOKEN_HINT}"
            )
        self.timeout = timeout
        self._token = token
        self._auth: str | None = None

    def project_url(self, project_id: int) -> str:
        return f"{self.url}/projects/{project_id}/data"

    def _authorization(self) -> str:
        if self._auth is None:
            if _JWT.match(self._token):  # a personal access token: exchange it for a short-lived access token
                answer = self.request(
                    "POST",
                    "/api/token/refresh/",
                    {"refresh": self._token},
                    what="exchange the access token",
                    auth=False,
                )
                access = answer.get("access") if isinstance(answer, dict) else None
                if not isinstance(access, str) or not access:
                    raise UserError(
                        f"Label Studio's answer to POST {self.url}/api/token/refresh/ holds no access token. "
                        f"{TOKEN_HINT}"
                    )
                self._auth = f"Bearer {access}"
            else:
                self._auth = f"Token {self._token}"
        return self._auth

    def request(
        self,
        method: str,
        path: str,
        body=None,
        *,
        what: str,
        query: dict | None = None,
        not_found: str | None = None,
        refused: str = "",
        raw: bool = False,
        auth: bool = True,
    ):
        """Send one request; the parsed JSON answer (the bytes with raw=True).

        `what` says what the request is for ("create the project"); `not_found` is the message for a 404
        (None: the server is not the Label Studio API that this expects); `refused` is added to the message
        for a 400 (Label Studio's validation errors are quoted)."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        name = f"{method} {self.url}{target}"
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = self._authorization()
        req = urllib.request.Request(self.url + target, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status = resp.status
                answer = resp.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            try:
                detail = _detail(exc.read(64 * 1024))
            except (OSError, http.client.HTTPException):
                detail = ""
            raise UserError(_http_message(exc.code, name, what, detail, not_found, refused)) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                why = f"no answer within {self.timeout:.0f} s"
            else:
                why = str(reason) or type(reason).__name__
            raise UserError(
                f"Cannot reach Label Studio to {what}: {name} failed ({why}). Check --url and that the Label "
                "Studio server is running and reachable from here. Nothing was changed in the study."
            ) from None
        if len(answer) > MAX_ANSWER:
            raise UserError(f"Label Studio's answer to {name} is larger than {MAX_ANSWER // 2**20} MiB; not read.")
        if raw:
            return answer
        if status == 204 or not answer.strip():
            return None
        try:
            return parse_json(answer, f"Label Studio's answer to {name}")
        except UserError as exc:
            raise UserError(
                f"{exc} Is --url the Label Studio server itself (not a proxy's page or another service)?"
            ) from None

    def checked(self, value, check, name: str):
        """`check(value)` (a `want_*` shape check), a JsonShapeError turned into one message naming the request."""
        try:
            return check(value)
        except JsonShapeError as exc:
            raise UserError(
                f"Label Studio's answer to {name} is not what clipfail expects: {exc} Is this Label Studio 1.x "
                "(clipfail is tested with 1.23.2)?"
            ) from None


def _detail(body: bytes) -> str:
    """Label Studio's reason in an error answer: `detail` and `validation_errors`, or the start of the text."""
    try:
        doc = json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # not JSON, or nested beyond the parser (a broken proxy's answer)
        text = " ".join(body.decode("utf-8", "replace").split())
        return "" if text.lower().startswith(("<!doctype", "<html")) else text[:300]
    if not isinstance(doc, dict):
        return str(doc)[:300]
    parts = []
    errors = doc.get("validation_errors")
    if isinstance(errors, dict):
        for field, msgs in errors.items():
            msgs = msgs if isinstance(msgs, list) else [msgs]
            parts += [f"{'' if field == 'non_field_errors' else field + ': '}{' '.join(str(m).split())}" for m in msgs]
    elif isinstance(doc.get("detail"), str):
        parts.append(doc["detail"])
    elif doc:
        parts.append(json.dumps(doc)[:300])
    return "; ".join(parts)[:1000]


def _http_message(status: int, name: str, what: str, detail: str, not_found: str | None, refused: str) -> str:
    said = f": {detail}" if detail else ""
    if status in (401, 403):
        return (
            f"Label Studio refused the token ({name} answered HTTP {status}{said}), so clipfail could not {what}. "
            f"{TOKEN_HINT}"
        )
    if status == 404:
        return (
            f"{not_found} ({name} answered HTTP 404{said})."
            if not_found
            else f"Label Studio has no {name.split(' ', 1)[1]} (HTTP 404{said}). Check that --url is the Label Studio "
            "server (its start page, not a page under it)."
        )
    if status >= 500:
        return (
            f"Label Studio failed with a server error while clipfail tried to {what} ({name} answered HTTP "
            f"{status}{said}). Its log says why; try again once the server is fixed. Nothing was changed in the study."
        )
    return f"Label Studio refused to {what} ({name} answered HTTP {status}{said}).{' ' + refused if refused else ''}"
