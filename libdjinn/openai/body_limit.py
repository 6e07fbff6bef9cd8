"""A cap on request bodies, checked as the bytes arrive and before anything parses them (FastAPI would
read and parse any size): past it the client gets OpenAI's JSON error with status 413."""
from libdjinn.openai.errors import ApiError, error_response


class BodyLimit:
    """ASGI middleware: buffers a body up to max_bytes, then hands it on; more is refused."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return                            # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        return await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope, receive, send):
        await error_response(ApiError(413, f"the request body exceeds {self.max_bytes} bytes (--max-body-bytes)",
                                      "invalid_request_error", None, "request_too_large"))(scope, receive, send)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()                # waits for the disconnect, as the app expects
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replayed
