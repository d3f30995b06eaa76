//! SHA-256 through ring (BoringSSL's assembly, with SHA extensions where the CPU has them): the
//! same speed whatever the release profile's opt-level, and the implementation rustls already
//! carries, so the binary holds one SHA-256 for files and parts rather than two.
//!
//! CRC-64/NVME (S3's `CRC64NVME`, the full-object checksum of multipart uploads) through
//! crc64fast-nvme: carry-less multiplication (PCLMULQDQ, PMULL) where the CPU has it, a table
//! elsewhere (armv7). Combining two checksums (a whole object's from its parts') is written
//! here, zlib's `crc32_combine` for 64 bits: crc-fast has it, but took the binary from 7.6 to
//! 8.3 MiB, over the 8 MiB goal.
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

/// A streaming SHA-256 whose state can be saved at a block boundary and taken up again in
/// another process (the relay keeps it in S3 between the parts of a transfer). Built on the
/// compression function of the `sha2` crate (already in the binary, through aws-sigv4): ring
/// does not expose its midstate.
#[derive(Clone)]
pub struct Sha256Resumable {
    state: [u32; 8],
    /// Bytes compressed into `state` (a multiple of 64).
    compressed: u64,
    /// Bytes after them, fewer than 64.
    tail: Vec<u8>,
}

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const SHA256_H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

impl Default for Sha256Resumable {
    fn default() -> Sha256Resumable {
        Sha256Resumable::new()
    }
}

impl Sha256Resumable {
    /// An empty hash.
    pub fn new() -> Sha256Resumable {
        Sha256Resumable::from_midstate(SHA256_H0, 0)
    }

    /// A hash taken up at a saved midstate covering `compressed` bytes (a multiple of 64).
    pub fn from_midstate(state: [u32; 8], compressed: u64) -> Sha256Resumable {
        Sha256Resumable {
            state,
            compressed,
            tail: Vec::with_capacity(64),
        }
    }

    /// The bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.compressed + self.tail.len() as u64
    }

    /// The midstate and the bytes it covers, if the bytes so far end on a block boundary.
    pub fn midstate(&self) -> Option<([u32; 8], u64)> {
        self.tail
            .is_empty()
            .then_some((self.state, self.compressed))
    }

    /// Adds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        if !self.tail.is_empty() {
            let take = (64 - self.tail.len()).min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() < 64 {
                return;
            }
            let block: [u8; 64] = self.tail[..].try_into().expect("64 bytes");
            sha2::block_api::compress256(&mut self.state, &[block]);
            self.compressed += 64;
            self.tail.clear();
        }
        let (blocks, rest) = data.as_chunks::<64>();
        sha2::block_api::compress256(&mut self.state, blocks);
        self.compressed += 64 * blocks.len() as u64;
        self.tail.extend_from_slice(rest);
    }

    /// The digest (FIPS 180-4 padding: 0x80, zeros, the length in bits).
    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len() * 8;
        let mut last = std::mem::take(&mut self.tail);
        last.push(0x80);
        while last.len() % 64 != 56 {
            last.push(0);
        }
        last.extend_from_slice(&bits.to_be_bytes());
        let (blocks, _) = last.as_chunks::<64>();
        sha2::block_api::compress256(&mut self.state, blocks);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
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

    /// The checksum of `a` followed by `b`, from the checksum of each and the length of `b`
    /// (a whole object's from its parts').
    ///
    /// CRC-64/NVME starts from and ends with all ones, so (as for zlib's CRC-32) the whole's
    /// checksum is `a` advanced over `b_len` zero bytes, XOR `b`. Advancing is a linear map on
    /// the 64-bit register; it is built for one zero bit from the (reflected) polynomial and
    /// squared up to the bits of `b_len`: about 2·log2(b_len) 64×64 matrix squarings.
    pub fn combine(a: u64, b: u64, b_len: u64) -> u64 {
        /// The reflected polynomial of CRC-64/NVME (0xad93d23594c93659).
        const POLY: u64 = 0x9a6c_9329_ac4b_c9b5;
        fn times(mat: &[u64; 64], mut vec: u64) -> u64 {
            let mut sum = 0;
            let mut i = 0;
            while vec != 0 {
                if vec & 1 != 0 {
                    sum ^= mat[i];
                }
                vec >>= 1;
                i += 1;
            }
            sum
        }
        fn square(mat: &[u64; 64]) -> [u64; 64] {
            std::array::from_fn(|n| times(mat, mat[n]))
        }
        if b_len == 0 {
            return a;
        }
        // One zero bit, then two, then four.
        let mut odd = [0u64; 64];
        odd[0] = POLY;
        for (n, row) in odd.iter_mut().enumerate().skip(1) {
            *row = 1 << (n - 1);
        }
        let mut even = square(&odd);
        odd = square(&even);
        let (mut crc, mut len) = (a, b_len);
        loop {
            // One zero byte the first time round, and doubling after.
            even = square(&odd);
            if len & 1 != 0 {
                crc = times(&even, crc);
            }
            len >>= 1;
            if len == 0 {
                break;
            }
            odd = square(&even);
            if len & 1 != 0 {
                crc = times(&odd, crc);
            }
            len >>= 1;
            if len == 0 {
                break;
            }
        }
        crc ^ b
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

    /// The checksums of parts combine into the whole's, whatever the cut.
    #[test]
    fn crc64nvme_of_parts_combine_into_the_whole() {
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i * 31 + i / 7).to_le_bytes()[0])
            .collect();
        for cut in [
            0, 1, 2, 3, 7, 8, 9, 4095, 4096, 50_000, 65_537, 99_999, 100_000,
        ] {
            let (a, b) = data.split_at(cut);
            let whole =
                Crc64Nvme::combine(Crc64Nvme::digest(a), Crc64Nvme::digest(b), b.len() as u64);
            assert_eq!(whole, Crc64Nvme::digest(&data), "cut at {cut}");
        }
    }

    /// The resumable SHA-256 agrees with ring on every length around the block and padding
    /// boundaries, fed in odd pieces, and when saved at a boundary and taken up again.
    #[test]
    fn resumable_sha256_matches_and_resumes() {
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i * 7 + i / 13).to_le_bytes()[0])
            .collect();
        for len in [
            0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 4096, 5000,
        ] {
            let want = Sha256::digest(&data[..len]);
            let mut h = Sha256Resumable::new();
            for piece in data[..len].chunks(37) {
                h.update(piece);
            }
            assert_eq!(h.len(), len as u64);
            assert_eq!(h.finalize(), want, "length {len}");
        }
        let mut h = Sha256Resumable::new();
        h.update(&data[..4096]);
        let (state, n) = h.midstate().expect("a block boundary");
        assert_eq!(n, 4096);
        let mut again = Sha256Resumable::from_midstate(state, n);
        again.update(&data[4096..]);
        assert_eq!(again.finalize(), Sha256::digest(&data));
        let mut odd = Sha256Resumable::new();
        odd.update(&data[..100]);
        assert!(odd.midstate().is_none());
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
