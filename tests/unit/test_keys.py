import base64
import os
import stat

import pytest

from tailpy.daemon.state import StateStore
from tailpy.errors import ConfigError, InvalidKeyError
from tailpy.keys import DiscoPrivate, MachinePrivate, MachinePublic, NodePrivate, NodePublic

# RFC 7748 §6.1: Alice's private key and public key.
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_public_key_matches_rfc7748_vector() -> None:
    assert NodePrivate(ALICE_PRIV).public.raw == ALICE_PUB


def test_text_forms_round_trip() -> None:
    k = NodePrivate.generate()
    pub = k.public
    assert pub.text() == "nodekey:" + pub.raw.hex()
    assert NodePublic.from_text(pub.text()) == pub
    assert NodePublic.from_base64(pub.base64()) == pub
    assert NodePrivate.from_text(k.text()).raw == k.raw
    assert NodePrivate.from_base64(k.base64()).raw == k.raw
    assert MachinePrivate.generate().public.text().startswith("mkey:")
    assert DiscoPrivate.generate().public.text().startswith("discokey:")


def test_wg_base64_form() -> None:
    # wg(8) writes standard base64 with padding: 44 characters.
    assert NodePublic(ALICE_PUB).base64() == base64.b64encode(ALICE_PUB).decode()
    assert len(NodePublic(ALICE_PUB).base64()) == 44


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("mkey:" + "00" * 32, "must start with 'nodekey:'"),
        ("nodekey:" + "00" * 31, "64 hex digits"),
        ("nodekey:" + "zz" * 32, "not hexadecimal"),
    ],
)
def test_malformed_text_says_why(text: str, needle: str) -> None:
    with pytest.raises(InvalidKeyError, match=needle):
        NodePublic.from_text(text)


def test_malformed_base64_and_length() -> None:
    with pytest.raises(InvalidKeyError, match="base64"):
        NodePublic.from_base64("not base64!")
    with pytest.raises(InvalidKeyError, match="32 bytes, got 31"):
        NodePublic.from_base64(base64.b64encode(b"\x01" * 31).decode())
    with pytest.raises(InvalidKeyError, match="32 bytes, got 3"):
        MachinePublic(b"abc")


def test_private_key_repr_hides_secret() -> None:
    k = NodePrivate.generate()
    assert k.raw.hex() not in repr(k)
    assert k.public.text() in repr(k)


def test_state_file_is_private_and_stable(tmp_path: os.PathLike[str]) -> None:
    store = StateStore(os.path.join(tmp_path, "node"))
    first = store.load_or_create()
    mode = stat.S_IMODE(os.stat(store.path).st_mode)
    assert mode == 0o600
    again = StateStore(os.path.join(tmp_path, "node")).load_or_create()
    assert again.machine_key.raw == first.machine_key.raw
    assert again.node_key.raw == first.node_key.raw


def test_corrupt_state_file_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    store = StateStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match="move it away"):
        store.load_or_create()
