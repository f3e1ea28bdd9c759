"""Bearer tokens for the Serve app: the admin endpoints always need one, the model endpoints when
``auth.inference`` is on (:class:`heygen_ray.config.ServeAuthSpec`).

A token comes from a file (a mounted Secret: read once, stripped) or else an environment variable of
the ingress replica's process. Tokens are compared with :func:`hmac.compare_digest`, so the time a
check takes does not depend on how much of a guess was right. A request without a valid token is
refused (401) before anything else happens; with no admin token configured, the admin endpoints are
off (403) rather than open.
"""

from __future__ import annotations

import hmac
import os
from typing import Mapping, Optional, Tuple

from heygen_ray.serve.schemas import BadInputError


def read_token(path: Optional[str], env: str) -> Optional[str]:
    """The token in ``path`` if set (a file that cannot be read is an error naming it, never an
    open endpoint), else ``$env``; None when neither holds a non-empty token."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as err:
            raise ValueError(f"auth: cannot read the token file {path}: {err}") from None
        if not token:
            raise ValueError(f"auth: the token file {path} is empty")
        return token
    return os.environ.get(env, "").strip() or None


def bearer(headers: Mapping[str, str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header (None without one)."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _matches(given: str, tokens: Tuple[str, ...]) -> bool:
    ok = False
    for t in tokens:  # every token compared, whichever matches
        ok |= hmac.compare_digest(given.encode("utf-8"), t.encode("utf-8"))
    return ok


class TokenGuard:
    """The checks an ingress replica makes: :meth:`admin` and :meth:`inference` raise a 401/403
    `BadInputError` (field ``authorization``) or return."""

    def __init__(self, admin: Optional[str], inference: Optional[str], inference_required: bool) -> None:
        if inference_required and not (inference or admin):
            raise ValueError("auth.inference is on but no token is configured: set auth.inference_token_file or "
                             "the variable auth.inference_token_env names (or an admin token)")
        self.admin_tokens = (admin,) if admin else ()
        self.inference_tokens = tuple(t for t in (inference, admin) if t)
        self.inference_required = inference_required

    @classmethod
    def from_spec(cls, auth) -> "TokenGuard":
        """From a `ServeAuthSpec`, reading the files and variables in this process."""
        return cls(read_token(auth.admin_token_file, auth.admin_token_env),
                   read_token(auth.inference_token_file, auth.inference_token_env), auth.inference)

    @staticmethod
    def _check(headers: Mapping[str, str], tokens: Tuple[str, ...], what: str) -> None:
        given = bearer(headers)
        if given is None:
            raise BadInputError("authorization", f"{what} needs a bearer token (Authorization: Bearer <token>)", 401)
        if not _matches(given, tokens):
            raise BadInputError("authorization", "invalid token", 401)

    def admin(self, headers: Mapping[str, str]) -> None:
        if not self.admin_tokens:
            raise BadInputError("authorization", "the admin endpoints are off: no admin token is configured "
                                "(auth.admin_token_file, or the variable auth.admin_token_env names)", 403)
        self._check(headers, self.admin_tokens, "this admin endpoint")

    def inference(self, headers: Mapping[str, str]) -> None:
        if self.inference_required:
            self._check(headers, self.inference_tokens, "this endpoint")
