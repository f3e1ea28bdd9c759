"""Getting a request's inputs safely: body caps, content types, multipart, video URIs, frame counts.

Serve puts no limit on request bodies: :func:`read_body` refuses a body over the cap
from its Content-Length, and counts the bytes of one sent without it as they arrive. Multipart is
parsed with the standard library's email parser (no extra dependency).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from heygen_ray.serve.schemas import BadInputError

VIDEO_TYPES = ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/avi", "video/x-msvideo",
               "application/octet-stream")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: from Content-Length before reading,
    and by counting the chunks of a body sent without one."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise BadInputError("content-length", f"not an integer: {length!r}", 400) from None
        if n > limit:
            raise BadInputError("body", f"{n} bytes > the limit of {limit} bytes", 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadInputError("body", f"more than the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def content_type(headers: Any) -> str:
    return (headers.get("content-type") or "").split(";")[0].strip().lower()


def parse_multipart(body: bytes, ctype_header: str) -> Dict[str, List[Tuple[Optional[str], Optional[str], bytes]]]:
    """multipart/form-data -> {field name: [(filename, content type, bytes), ...]}."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if "boundary=" not in ctype_header:
        raise BadInputError("body", "multipart/form-data without a boundary", 400)
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype_header.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise BadInputError("body", "malformed multipart body", 400)
    fields: Dict[str, List[Tuple[Optional[str], Optional[str], bytes]]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        ptype = part.get_content_type() if part.get("content-type") else None
        fields.setdefault(str(name), []).append((part.get_filename(), ptype, data))
    return fields


def upload_from_multipart(fields: Dict[str, List[Tuple[Optional[str], Optional[str], bytes]]], name: str = "video") -> bytes:
    if name not in fields:
        raise BadInputError(name, f"missing file field {name!r} (send the video as multipart field {name!r})")
    _, ptype, data = fields[name][0]
    if ptype is not None and ptype not in VIDEO_TYPES and not ptype.startswith("video/"):
        raise BadInputError(name, f"content type {ptype!r} is not a video (expected video/mp4)", 415)
    if not data:
        raise BadInputError(name, "empty file")
    return data


def read_video_uri(uri: str, allowed_root: Optional[str], max_bytes: int) -> bytes:
    """The bytes of a video named by URI, only when it lies under ``allowed_root`` (local paths are
    resolved, symlinks and ``..`` included, before the check)."""
    from heygen_ray import fsutil

    if allowed_root is None:
        raise BadInputError("uri", "video URIs are not accepted by this server (no allowed_uri_root configured); upload the file", 403)
    if "://" in uri and not uri.startswith("file://"):
        root = allowed_root.rstrip("/") + "/"
        if ".." in uri.split("/") or not uri.startswith(root):
            raise BadInputError("uri", f"outside the allowed root {allowed_root}", 403)
        target = uri
    else:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if "\x00" in path:
            raise BadInputError("uri", "contains a NUL character")
        if not os.path.isabs(path):
            raise BadInputError("uri", "must be an absolute path or a URI")
        real, root = os.path.realpath(path), os.path.realpath(allowed_root)
        if os.path.commonpath([real, root]) != root:
            raise BadInputError("uri", f"outside the allowed root {allowed_root}", 403)
        if not os.path.isfile(real):
            raise BadInputError("uri", "no such file", 404)
        if os.path.getsize(real) > max_bytes:
            raise BadInputError("uri", f"file of {os.path.getsize(real)} bytes > the limit of {max_bytes} bytes", 413)
        target = real
    try:
        data = fsutil.read_bytes(target)
    except (OSError, FileNotFoundError) as err:
        raise BadInputError("uri", f"cannot read: {err}", 404) from None
    if len(data) > max_bytes:
        raise BadInputError("uri", f"file of {len(data)} bytes > the limit of {max_bytes} bytes", 413)
    return data


def probe_frames(data: bytes, field: str = "video") -> int:
    """Frames the container declares for its first video stream (0 when it does not say), raising a
    4xx when the bytes are not a video container at all. Cheap: reads headers, decodes nothing."""
    import io

    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.video:
                raise BadInputError(field, "not a video: no video stream")
            return int(c.streams.video[0].frames or 0)
    except BadInputError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as err:
        raise BadInputError(field, f"cannot decode the video: {type(err).__name__}: {err}") from None
