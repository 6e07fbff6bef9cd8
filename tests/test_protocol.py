"""Wire format: frames round-trip, and bad requests are refused with a code that names the problem."""
import pytest

from libdjinn.protocol import HEADER, ErrorCode, ProtocolError, check_request, decode_body, encode_frame


def test_frame_round_trip():
    frame = encode_frame({"type": "generate", "id": 3, "session": 1, "prompt_ids": [1, 2]})
    (size,) = HEADER.unpack(frame[:HEADER.size])
    assert size == len(frame) - HEADER.size
    message = decode_body(frame[HEADER.size:])
    assert check_request(message) == {"session": 1, "prompt_ids": [1, 2]}


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1a\x01"])
def test_non_map_bodies_are_bad_frames(body):
    with pytest.raises(ProtocolError) as e:
        decode_body(body)
    assert e.value.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("message, code, words", [
    ({"type": "nope", "id": 1}, ErrorCode.UNKNOWN_TYPE, "nope"),
    ({"type": "status"}, ErrorCode.BAD_REQUEST, "'id'"),
    ({"type": "close_session", "id": 1}, ErrorCode.BAD_REQUEST, "'session' is required"),
    ({"type": "close_session", "id": 1, "session": True}, ErrorCode.BAD_REQUEST, "wrong type"),
    ({"type": "generate", "id": 1, "session": 1, "evil": 1}, ErrorCode.BAD_REQUEST, "'evil'"),
])
def test_bad_requests_name_the_problem(message, code, words):
    with pytest.raises(ProtocolError) as e:
        check_request(message)
    assert e.value.code == code and words in e.value.message
