"""Sealed control messages (tailpy.proto.control): round trips, forgery, replays, fuzzing."""

from __future__ import annotations

import base64
import contextlib
import json

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.errors import ParseError
from tailpy.keys import MachinePrivate
from tailpy.proto import control as proto

NOW = 1_700_000_000.0


def mk() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


NODE, SERVER, OTHER = mk(), mk(), mk()


def test_public_of_matches_keys_module() -> None:
    assert proto.public_of(NODE) == NODE.public


def test_request_round_trip() -> None:
    sealed = proto.seal_request(NODE, SERVER.public, "/machine/register", {"hostname": "a"}, now=NOW)
    opened = proto.open_request(SERVER, sealed.data, path="/machine/register")
    assert opened.machine_key == NODE.public
    assert opened.body["hostname"] == "a"
    assert opened.body["ts"] == NOW
    assert opened.nonce_id == sealed.nonce_id
    assert b"hostname" not in sealed.data  # confidential


def test_request_for_other_path_refused() -> None:
    sealed = proto.seal_request(NODE, SERVER.public, "/machine/update", {}, now=NOW)
    with pytest.raises(proto.UnauthenticatedError, match="was made for '/machine/update'"):
        proto.open_request(SERVER, sealed.data, path="/machine/register")


def test_claiming_another_machine_key_refused() -> None:
    sealed = proto.seal_request(NODE, SERVER.public, "/p", {}, now=NOW)
    envelope = json.loads(sealed.data)
    envelope["machine_key"] = OTHER.public.text()
    with pytest.raises(proto.UnauthenticatedError, match="does not open with machine key"):
        proto.open_request(SERVER, json.dumps(envelope).encode(), path="/p")


def test_sealed_for_other_server_refused() -> None:
    sealed = proto.seal_request(NODE, OTHER.public, "/p", {}, now=NOW)
    with pytest.raises(proto.UnauthenticatedError):
        proto.open_request(SERVER, sealed.data, path="/p")


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{}", b'{"machine_key": "mkey:00"}', b'{"machine_key": 5, "box": "x"}', b"\xff\xfe"],
)
def test_malformed_requests_raise_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError):
        proto.open_request(SERVER, data, path="/p")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda s: s.encode(), st.text(max_size=200)))
def test_open_request_fuzz(data: bytes) -> None:
    with contextlib.suppress(ParseError):  # anything else fails the test
        proto.open_request(SERVER, data, path="/p")


def test_replay_guard_refuses_replay_and_stale() -> None:
    guard = proto.ReplayGuard(window=120)
    sealed = proto.seal_request(NODE, SERVER.public, "/p", {}, now=NOW)
    req = proto.open_request(SERVER, sealed.data, path="/p")
    guard.check(req, NOW + 1)
    with pytest.raises(proto.ReplayError, match="replay"):
        guard.check(req, NOW + 2)
    stale = proto.open_request(
        SERVER, proto.seal_request(NODE, SERVER.public, "/p", {}, now=NOW - 121).data, path="/p"
    )
    with pytest.raises(proto.ReplayError, match="clock"):
        guard.check(stale, NOW)
    # Entries are forgotten after the window (by then ts alone refuses the request).
    guard.check(
        proto.open_request(
            SERVER, proto.seal_request(NODE, SERVER.public, "/p", {}, now=NOW + 500).data, path="/p"
        ),
        NOW + 500,
    )
    assert len(guard._seen) == 1


def test_response_round_trip_and_binding() -> None:
    box = proto.seal_response(SERVER, NODE.public, "abc", {"ok": True}, seq=3)
    assert proto.open_response(NODE, SERVER.public, box, reply_to="abc", seq=3)["ok"] is True
    with pytest.raises(proto.UnauthenticatedError, match="reply_to"):
        proto.open_response(NODE, SERVER.public, box, reply_to="other")
    with pytest.raises(proto.UnauthenticatedError, match="seq"):
        proto.open_response(NODE, SERVER.public, box, reply_to="abc", seq=4)
    with pytest.raises(proto.UnauthenticatedError):
        proto.open_response(OTHER, SERVER.public, box, reply_to="abc")


DEEP = b'{"a":' * 5000  # 25 KB of nesting: json.loads raises RecursionError, not ValueError


def test_deeply_nested_json_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="control request is nested too deeply"):
        proto.open_request(SERVER, DEEP, path="/p")
    # Sealed by a real machine key: the box opens, its plaintext is the nesting.
    box = base64.b64encode(bytes(proto._box(NODE, SERVER.public).encrypt(DEEP))).decode()
    envelope = json.dumps({"machine_key": NODE.public.text(), "box": box}).encode()
    with pytest.raises(ParseError, match="sealed control message is nested too deeply"):
        proto.open_request(SERVER, envelope, path="/p")
