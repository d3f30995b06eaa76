//! SHA-256 through ring (BoringSSL's assembly, with SHA extensions where the CPU has them): the
//! same speed whatever the release profile's opt-level, and the implementation rustls already
//! carries, so the binary holds one SHA-256 for files and parts rather than two.
//!
//! CRC-64/NVME (S3's `CRC64NVME`, the full-object checksum of multipart uploads) through
//! crc64fast-nvme: carry-less multiplication (PCLMULQDQ, PMULL) where the CPU has it, a table
//! elsewhere (armv7).
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

/// A streaming CRC-64/NVME, as S3 computes `x-amz-checksum-crc64nvme`.
#[derive(Clone)]
pub struct Crc64Nvme(crc64fast_nvme::Digest);

impl Default for Crc64Nvme {
    /// An empty checksum.
    fn default() -> Crc64Nvme {
        Crc64Nvme::new()
    }
}

impl Crc64Nvme {
    /// An empty checksum.
    pub fn new() -> Crc64Nvme {
        Crc64Nvme(crc64fast_nvme::Digest::new())
    }

    /// Adds the next bytes.
    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        self.0.write(data.as_ref());
    }

    /// The checksum of the bytes so far.
    pub fn sum(&self) -> u64 {
        self.0.sum64()
    }

    /// The checksum of `data` in one call.
    pub fn digest(data: impl AsRef<[u8]>) -> u64 {
        let mut c = Crc64Nvme::new();
        c.update(data);
        c.sum()
    }

    /// As S3 writes it: base64 of the 8 big-endian bytes.
    pub fn b64(sum: u64) -> String {
        crate::s3::b64(&sum.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check value of CRC-64/NVME ("123456789"), fed in two pieces, and S3's encoding.
    #[test]
    fn crc64nvme_known_answer() {
        let mut c = Crc64Nvme::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.sum(), 0xae8b_1486_0a79_9888);
        assert_eq!(Crc64Nvme::digest(b"123456789"), c.sum());
        assert_eq!(Crc64Nvme::b64(0xae8b_1486_0a79_9888), "rosUhgp5mIg=");
    }

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
