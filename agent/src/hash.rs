//! SHA-256 through ring (BoringSSL's assembly, with SHA extensions where the CPU has them): the
//! same speed whatever the release profile's opt-level, and the implementation rustls already
//! carries, so the binary holds one SHA-256 for files and parts rather than two.
//!
//! Must not break: one SHA-256 implementation for files, parts and the signature.

/// A streaming SHA-256.
#[derive(Clone)]
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    /// An empty hash.
    fn default() -> Sha256 {
        Sha256::new()
    }
}

impl Sha256 {
    /// An empty hash.
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Adds the next bytes.
    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        self.0.update(data.as_ref());
    }

    /// The digest.
    pub fn finalize(self) -> [u8; 32] {
        self.0
            .finish()
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }

    /// The SHA-256 of `data` in one call.
    pub fn digest(data: impl AsRef<[u8]>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(data);
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known digests (the empty string; "abc" of FIPS 180-2, fed in two pieces).
    #[test]
    fn known_answers() {
        assert_eq!(
            hex::encode(Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = Sha256::new();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(
            hex::encode(h.finalize()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
