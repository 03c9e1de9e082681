//! X25519 keys as WireGuard uses them (RFC 7748).

use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use std::fmt;

/// Length of every key: private, public, preshared.
pub const KEY_LEN: usize = 32;

/// A malformed key; the message is one sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// Clamp a scalar as X25519 does (RFC 7748 §5), which is how WireGuard stores private keys.
pub fn clamp(mut k: [u8; KEY_LEN]) -> [u8; KEY_LEN] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

/// A new random private key from the OS generator, clamped.
pub fn generate_private_key() -> [u8; KEY_LEN] {
    clamp(StaticSecret::random_from_rng(OsRng).to_bytes())
}

/// Check a key's length and copy it into an array; `what` names it in the error ("peer public key").
pub fn key_from_slice(raw: &[u8], what: &str) -> Result<[u8; KEY_LEN], KeyError> {
    raw.try_into()
        .map_err(|_| KeyError(format!("{what} must be {KEY_LEN} bytes, got {}", raw.len())))
}

/// The X25519 public key of a private key.
pub fn public_key(private_key: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    PublicKey::from(&StaticSecret::from(*private_key)).to_bytes()
}

/// Reject a private key that is all zeros (never a real key; a sign of an uninitialised buffer).
pub fn check_private_key(private_key: &[u8; KEY_LEN], what: &str) -> Result<(), KeyError> {
    if private_key.iter().all(|&b| b == 0) {
        return Err(KeyError(format!("{what} is all zeros")));
    }
    Ok(())
}

/// Reject a peer public key of small order (all zeros included): Diffie-Hellman with it would give the
/// all-zero shared secret, so no handshake could be authenticated.
pub fn check_peer_public_key(public: &[u8; KEY_LEN], what: &str) -> Result<(), KeyError> {
    if public.iter().all(|&b| b == 0) {
        return Err(KeyError(format!("{what} is all zeros")));
    }
    // Any fixed scalar works: the product with a small-order point is the identity (all zeros) whatever it is.
    let probe = StaticSecret::from(clamp([0x5a; KEY_LEN]));
    if !probe
        .diffie_hellman(&PublicKey::from(*public))
        .was_contributory()
    {
        return Err(KeyError(format!(
            "{what} is a low-order point, which WireGuard cannot use"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn rfc7748_vectors() {
        // RFC 7748 §6.1: Alice and Bob.
        let a = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let a_pub = unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let b = unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        let b_pub = unhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        assert_eq!(public_key(&a), a_pub);
        assert_eq!(public_key(&b), b_pub);
        let shared = StaticSecret::from(a).diffie_hellman(&PublicKey::from(b_pub));
        assert_eq!(
            shared.to_bytes(),
            unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let k1 = generate_private_key();
        let k2 = generate_private_key();
        assert_ne!(k1, k2);
        assert_eq!(k1, clamp(k1));
    }

    #[test]
    fn low_order_points_rejected() {
        assert!(check_peer_public_key(&[0; 32], "peer public key").is_err());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(check_peer_public_key(&one, "peer public key").is_err());
        // A point of order 8 (from the list in libsodium / curve25519 literature).
        let p8 = unhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800");
        assert!(check_peer_public_key(&p8, "peer public key").is_err());
        let good = public_key(&generate_private_key());
        assert!(check_peer_public_key(&good, "peer public key").is_ok());
        assert_eq!(
            key_from_slice(&[1; 31], "peer public key").unwrap_err().0,
            "peer public key must be 32 bytes, got 31"
        );
    }
}
