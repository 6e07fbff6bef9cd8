"""Errors as OpenAI reports them: {"error": {"message", "type", "param", "code"}} with its HTTP status."""
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def error_json(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_json(e), status_code=e.status)


async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI says 422; OpenAI says 400 and names the parameter."""
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        return error_response(bad_request(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return error_response(bad_request(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param))
